"""Batch and layer normalisation."""

from __future__ import annotations

from typing import Any

import numpy as np

from core.layers.base import Layer, Shape, ShapeError, side_by_side


class BatchNorm(Layer):
    """Normalise each channel (or feature) over the batch (and space).

    x: (N, F) or (N, H, W, C); gamma, beta: (F,) or (C,).
    Training: batch statistics, running stats updated with ``momentum`` and the
    unbiased variance (as PyTorch); evaluation: the running statistics.

    The work runs on wide rows: ``k`` consecutive rows of ``(N * H * W, C)`` side by
    side, with each per-channel vector repeated ``k`` times. NumPy sums a column and
    broadcasts a row one row at a time, so 16 channels would take 16-number steps; a
    channel's sum adds its ``k`` partial sums last.
    """

    type = "batchnorm"

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

    @staticmethod
    def _wide(a: Any) -> tuple[Any, int]:
        """``a`` (..., C) as (rows / k, k * C), with ``k`` from :func:`side_by_side`."""
        channels = a.shape[-1]
        rows = a.size // channels
        k = side_by_side(rows, channels)
        return a.reshape(rows // k, k * channels), k

    def _channel_means(self, wide: Any) -> Any:
        """Per-channel means of a wide array, repeated across its width."""
        channels = wide.shape[1] // self._k
        sums = wide.sum(axis=0).reshape(self._k, channels).sum(axis=0)
        return self._repeat(sums / self._count)

    def _repeat(self, per_channel: Any) -> Any:
        return self.xp.tile(per_channel, self._k)

    def forward(self, x: Any, training: bool) -> Any:
        xp = self.xp
        wide, self._k = self._wide(x)
        self._count = x.size // x.shape[-1]
        eps = self.spec.eps
        channels = x.shape[-1]
        if training:
            mean = self._channel_means(wide)
            centered = wide - mean
            var = self._channel_means(centered * centered)[:channels]
            m = self.spec.momentum
            unbiased = var * (self._count / max(self._count - 1, 1))
            running_mean, running_var = self.buffers["running_mean"], self.buffers["running_var"]
            running_mean *= 1 - m
            running_mean += m * mean[:channels]
            running_var *= 1 - m
            running_var += m * unbiased
        else:
            centered = wide - self._repeat(self.buffers["running_mean"])
            var = self.buffers["running_var"]
        inv_std = self._repeat(1.0 / xp.sqrt(var + eps))
        xhat = centered * inv_std
        self._xhat, self._inv_std, self._training = xhat, inv_std, training
        y = xhat * self._repeat(self.params["gamma"])
        y += self._repeat(self.params["beta"])
        return y.reshape(x.shape)

    def backward(self, dy: Any) -> Any:
        channels = dy.shape[-1]
        wide = dy.reshape(self._xhat.shape)
        xhat = self._xhat

        def channel_sums(a: Any) -> Any:
            return a.sum(axis=0).reshape(self._k, channels).sum(axis=0)

        self._accumulate("gamma", channel_sums(wide * xhat))  # dgamma = sum(dy * xhat)
        self._accumulate("beta", channel_sums(wide))  # dbeta = sum(dy)
        self._grads_done()
        dxhat = wide * self._repeat(self.params["gamma"])
        if self._training:
            # dx = inv_std * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)), per channel
            dx = dxhat - self._channel_means(dxhat)
            dx -= xhat * self._channel_means(dxhat * xhat)
            dx *= self._inv_std
        else:
            dx = dxhat * self._inv_std
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
