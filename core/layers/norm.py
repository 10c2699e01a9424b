"""Batch and layer normalisation."""

from __future__ import annotations

from typing import Any

import numpy as np

from core.layers.base import Layer, Shape, ShapeError, side_by_side
from core.layers.conv import Workspace

#: Numbers per piece of BatchNorm's passes over its rows: a few arrays of a piece stay in
#: the L2 cache, so each pass reads its input once from memory, not every step of it.
BATCHNORM_CHUNK = 1 << 16


class BatchNorm(Layer):
    """Normalise each channel (or feature) over the batch (and space).

    x: (N, F) or (N, H, W, C); gamma, beta: (F,) or (C,).
    Training: batch statistics, running stats updated with ``momentum`` and the
    unbiased variance (as PyTorch); evaluation: the running statistics.
    y = x * scale + shift with scale = gamma * inv_std, shift = beta - mean * scale (as
    PyTorch's CPU kernel), and
    dx = gamma * inv_std * (dy - mean(dy) - xhat * mean(dy * xhat)), per channel, with
    xhat = (x - mean) * inv_std recomputed from x: keeping x costs nothing (it is the
    previous layer's output), keeping xhat an array as large written and read again.

    The work runs on wide rows: ``k`` consecutive rows of ``(N * H * W, C)`` side by
    side, with each per-channel vector repeated ``k`` times. NumPy sums a column and
    broadcasts a row one row at a time, so 16 channels would take 16-number steps; a
    channel's sum adds its ``k`` partial sums last. With NumPy the rows go a piece at a
    time (``BATCHNORM_CHUNK`` numbers): the forward reads x three times (its sum, the
    sum of squares about the mean, the output) and the backward dy and x twice each.
    """

    type = "batchnorm"

    def __init__(self, spec: Any) -> None:
        super().__init__(spec)
        self._work = Workspace()

    def _infer(self, input_shape: Shape) -> Shape:
        if len(input_shape) not in (1, 3):
            raise ShapeError(
                f"batchnorm needs (features,) or an image (C, H, W), got {input_shape}", "type"
            )
        return input_shape

    def _channels(self) -> int:
        return self.input_shape[0]

    def param_shapes(self) -> dict[str, Shape]:
        return {"gamma": (self._channels(),), "beta": (self._channels(),)}

    def buffer_shapes(self) -> dict[str, Shape]:
        return {"running_mean": (self._channels(),), "running_var": (self._channels(),)}

    def _initial_value(self, name: str, shape: Shape, rng: np.random.Generator, *, he: bool):
        return np.ones(shape) if name == "gamma" else np.zeros(shape)

    def _initial_buffer(self, name: str, shape: Shape) -> np.ndarray:
        return np.ones(shape) if name == "running_var" else np.zeros(shape)

    # --- wide rows, in pieces ---------------------------------------------------------

    def _wide(self, a: Any) -> Any:
        """``a`` (..., C) as (rows / k, k * C), with ``k`` from :func:`side_by_side`."""
        channels = a.shape[-1]
        rows = a.size // channels
        self._k = side_by_side(rows, channels)
        return a.reshape(rows // self._k, self._k * channels)

    def _pieces(self, rows: int, width: int, dtype: Any) -> tuple[list[slice], Any]:
        """The row ranges of the passes (all rows at once except with NumPy; one, empty,
        for no rows), and a scratch array as large as the first."""
        step = max(rows, 1) if self.xp is not np else max(1, BATCHNORM_CHUNK // width)
        pieces = [slice(lo, min(lo + step, rows)) for lo in range(0, max(rows, 1), step)]
        work = self._work.scratch(self.xp, "work", (pieces[0].stop, width), dtype)
        return pieces, work

    def _per_channel(self, wide_sums: Any) -> Any:
        """(k * C,) sums of the wide columns -> (C,) per-channel sums."""
        return wide_sums.reshape(self._k, -1).sum(axis=0)

    def _repeat(self, per_channel: Any) -> Any:
        return self.xp.tile(per_channel, self._k)

    # --- passes -----------------------------------------------------------------------

    def forward(self, x: Any, training: bool) -> Any:
        xp = self.xp
        wide = self._wide(x)
        rows, width = wide.shape
        count = rows * self._k
        self._work.batch(rows)
        pieces, work = self._pieces(rows, width, x.dtype)
        if training:
            mean = self._per_channel(wide.sum(axis=0)) / count
            mean_row = self._repeat(mean)
            squares = xp.zeros(width, dtype=x.dtype)
            for part in pieces:
                centered = xp.subtract(wide[part], mean_row, out=work[: part.stop - part.start])
                centered *= centered
                squares += centered.sum(axis=0)
            var = self._per_channel(squares) / count
            m = self.spec.momentum
            unbiased = var * (count / max(count - 1, 1))
            running_mean, running_var = self.buffers["running_mean"], self.buffers["running_var"]
            running_mean *= 1 - m
            running_mean += m * mean
            running_var *= 1 - m
            running_var += m * unbiased
        else:
            mean = self.buffers["running_mean"]
            var = self.buffers["running_var"]
        inv_std = 1.0 / xp.sqrt(var + self.spec.eps)
        scale = self.params["gamma"] * inv_std
        scale_row, shift_row = self._repeat(scale), self._repeat(self.params["beta"] - mean * scale)
        y = self._work.output(xp, "y", wide.shape, x.dtype)
        for part in pieces:
            xp.multiply(wide[part], scale_row, out=y[part])
            y[part] += shift_row
        self._x, self._mean, self._inv_std, self._training = wide, mean, inv_std, training
        return y.reshape(x.shape)

    def backward(self, dy: Any) -> Any:
        xp = self.xp
        x = self._x
        rows, width = x.shape
        wide = dy.reshape(rows, width)
        pieces, work = self._pieces(rows, width, dy.dtype)
        mean_row = self._repeat(self._mean)
        sums = xp.zeros(width, dtype=dy.dtype)
        dots = xp.zeros(width, dtype=dy.dtype)  # sum(dy * (x - mean))
        for part in pieces:
            sums += wide[part].sum(axis=0)
            centered = xp.subtract(x[part], mean_row, out=work[: part.stop - part.start])
            centered *= wide[part]
            dots += centered.sum(axis=0)
        dbeta, dgamma = self._per_channel(sums), self._per_channel(dots) * self._inv_std
        self._accumulate("gamma", dgamma)  # sum(dy * xhat)
        self._accumulate("beta", dbeta)  # sum(dy)
        self._grads_done()
        scale = self.params["gamma"] * self._inv_std
        scale_row = self._repeat(scale)
        dx = self._work.output(xp, "dx", wide.shape, dy.dtype)
        if not self._training:  # the statistics are constants
            xp.multiply(wide, scale_row, out=dx)
            return dx.reshape(dy.shape)
        count = rows * self._k
        # dx = dy * scale - scale * mean(dy) - (x - mean) * scale * inv_std * mean(dy * xhat)
        centered_row = self._repeat(scale * self._inv_std * dgamma / count)
        mean_row_dy = self._repeat(scale * dbeta / count)
        for part in pieces:
            term = xp.subtract(x[part], mean_row, out=work[: part.stop - part.start])
            term *= centered_row
            xp.multiply(wide[part], scale_row, out=dx[part])
            dx[part] -= term
            dx[part] -= mean_row_dy
        return dx.reshape(dy.shape)


class LayerNorm(Layer):
    """Normalise each sample over its last axis.

    x: (N, ..., D) -> y; gamma, beta: (D,).  y = (x - mean) / sqrt(var + eps) * gamma + beta
    """

    type = "layernorm"
    groupable = True

    def __init__(self, spec: Any) -> None:
        super().__init__(spec)
        self._mean_weights: Any = None

    def _infer(self, input_shape: Shape) -> Shape:
        if len(input_shape) not in (1, 2):
            raise ShapeError(
                f"layernorm needs (features,) or (time, features), got {input_shape}", "type"
            )
        return input_shape

    def param_shapes(self) -> dict[str, Shape]:
        d = self.input_shape[-1]
        return {"gamma": (d,), "beta": (d,)}

    def _initial_value(self, name: str, shape: Shape, rng: np.random.Generator, *, he: bool):
        return np.ones(shape) if name == "gamma" else np.zeros(shape)

    def _row_mean(self, rows: Any) -> Any:
        """Mean of each row of ``rows: (R, D)`` as a matrix-vector product, (R, 1);
        several times faster than a reduction over the last axis. Under groups, each
        group's rows are those of its own product (see :meth:`_grouped_matmul`)."""
        d = rows.shape[1]
        weights = self._mean_weights
        if weights is None or weights.shape[0] != d or weights.dtype != rows.dtype:
            weights = self._mean_weights = self.xp.full((d, 1), 1.0 / d, dtype=rows.dtype)
        return self._grouped_matmul(rows, weights)

    # Both passes reuse their temporaries (the same numbers, fewer arrays in the cache).

    def forward(self, x: Any, training: bool) -> Any:
        xp = self.xp
        rows = x.reshape(-1, x.shape[-1])
        centered = rows - self._row_mean(rows)
        work = centered * centered
        var = self._row_mean(work)
        inv_std = 1.0 / xp.sqrt(var + self.spec.eps)
        xhat = xp.multiply(centered, inv_std, out=centered)
        self._xhat, self._inv_std = xhat, inv_std
        y = xp.multiply(xhat, self.params["gamma"], out=work)
        y += self.params["beta"]
        return y.reshape(x.shape)

    def backward(self, dy: Any) -> Any:
        d = dy.shape[-1]
        dy2 = dy.reshape(-1, d)
        xhat = self._xhat
        scaled = dy2 * xhat
        if self._groups is None:
            self._accumulate("gamma", scaled.sum(axis=0))
            self._accumulate("beta", dy2.sum(axis=0))
        else:  # each group's sums over its own rows, added along the trees
            gamma, beta = self._group_sums(scaled), self._group_sums(dy2)
            for tree, grads in zip(self._group_trees, self._group_grads, strict=True):
                self._tree_sum(tree, gamma, grads["gamma"])
                self._tree_sum(tree, beta, grads["beta"])
        self._grads_done()
        # dx = inv_std * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)), per row
        xp = self.xp
        dxhat = dy2 * self.params["gamma"]
        dx = dxhat - self._row_mean(dxhat)
        work = xp.multiply(dxhat, xhat, out=scaled)  # the gamma gradient is taken
        mean = self._row_mean(work)
        dx -= xp.multiply(xhat, mean, out=work)
        dx *= self._inv_std
        return dx.reshape(dy.shape)
