"""Convolution and pooling on channels-last batches.

Inside the engine an image batch is ``(N, H, W, C)``. A convolution gathers
its input windows once into ``cols: (N*OH*OW, KH*KW*C)`` (im2col through a
strided view and one copy into a reused buffer) and is then one matrix
product whose result is already channels-last: no transposes of activations.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from core.layers.base import Layer, Shape, ShapeError, init_weight, is_image


def _out_size(size: int, kernel: int, stride: int) -> int:
    return (size - kernel) // stride + 1


def _need_image(layer: str, input_shape: Shape, field: str) -> None:
    if not is_image(input_shape):
        raise ShapeError(
            f"{layer} needs an image input (channels, height, width), got {input_shape}", field
        )


class _BufferCache:
    """Work arrays reused across steps of the same batch size."""

    def __init__(self) -> None:
        self._arrays: dict[tuple[str, tuple[int, ...]], Any] = {}

    def get(self, xp: Any, name: str, shape: tuple[int, ...], dtype: Any, zero: bool = False):
        key = (name, shape)
        array = self._arrays.get(key)
        if array is None:
            array = xp.zeros(shape, dtype=dtype) if zero else xp.empty(shape, dtype=dtype)
            self._arrays[key] = array
        return array


def _windows(xp: Any, x: Any, out_h: int, out_w: int, kernel: int, stride: int):
    """Strided view ``(N, OH, OW, KH, KW, C)`` of the windows of ``x: (N, H, W, C)``."""
    n, _, _, c = x.shape
    s0, s1, s2, s3 = x.strides
    return xp.lib.stride_tricks.as_strided(
        x,
        shape=(n, out_h, out_w, kernel, kernel, c),
        strides=(s0, s1 * stride, s2 * stride, s1, s2, s3),
    )


class Conv2d(Layer):
    """2-D convolution (cross-correlation, as in PyTorch).

    x: (N, H, W, C) -> y: (N, OH, OW, F); W: (F, C, KH, KW) as in PyTorch, b: (F,).
    y = im2col(x) @ W_mat + b, W_mat = W as (KH*KW*C, F).
    """

    type = "conv2d"
    has_weights = True

    def __init__(self, spec: Any) -> None:
        super().__init__(spec)
        self._buffers = _BufferCache()

    def _infer(self, input_shape: Shape) -> Shape:
        _need_image("conv2d", input_shape, "kernel_size")
        c, h, w = input_shape
        k, p, s = self.spec.kernel_size, self.spec.padding, self.spec.stride
        if k > h + 2 * p or k > w + 2 * p:
            raise ShapeError(
                f"kernel_size {k} is larger than the padded input {h + 2 * p}x{w + 2 * p}",
                "kernel_size",
            )
        if p >= k:
            raise ShapeError(f"padding {p} must be smaller than kernel_size {k}", "padding")
        self._geometry = (c, h, w, _out_size(h + 2 * p, k, s), _out_size(w + 2 * p, k, s))
        return (self.spec.filters, self._geometry[3], self._geometry[4])

    def param_shapes(self) -> dict[str, Shape]:
        k = self.spec.kernel_size
        return {"W": (self.spec.filters, self.input_shape[0], k, k), "b": (self.spec.filters,)}

    def flops(self) -> int:
        c, _, _, oh, ow = self._geometry
        k, f = self.spec.kernel_size, self.spec.filters
        return oh * ow * f * (2 * c * k * k + 1)

    def _initial_value(self, name: str, shape: Shape, rng: np.random.Generator, *, he: bool):
        return init_weight(shape, rng, he=he) if name == "W" else np.zeros(shape)

    def _im2col(self, x: Any) -> Any:
        xp = self.xp
        n = x.shape[0]
        c, h, w, oh, ow = self._geometry
        k, p, s = self.spec.kernel_size, self.spec.padding, self.spec.stride
        if p:
            padded = self._buffers.get(xp, "padded", (n, h + 2 * p, w + 2 * p, c), x.dtype, True)
            padded[:, p : p + h, p : p + w, :] = x
            x = padded
        cols = self._buffers.get(xp, "cols", (n, oh, ow, k, k, c), x.dtype)
        cols[...] = _windows(xp, x, oh, ow, k, s)
        return cols.reshape(n * oh * ow, k * k * c)

    def forward(self, x: Any, training: bool) -> Any:
        n = x.shape[0]
        _, _, _, oh, ow = self._geometry
        k, f = self.spec.kernel_size, self.spec.filters
        self._cols = self._im2col(x)
        self._w_mat = self.params["W"].transpose(2, 3, 1, 0).reshape(-1, f)
        y = self._cols @ self._w_mat
        y += self.params["b"]
        self._batch = n
        del k
        return y.reshape(n, oh, ow, f)

    def backward(self, dy: Any) -> Any:
        c, h, w, oh, ow = self._geometry
        k, p, s, f = self.spec.kernel_size, self.spec.padding, self.spec.stride, self.spec.filters
        n = dy.shape[0]
        dy2 = dy.reshape(-1, f)
        # dW_mat = cols.T @ dy, then back to PyTorch's (F, C, KH, KW)
        dw_mat = self._cols.T @ dy2
        self._accumulate("W", dw_mat.reshape(k, k, c, f).transpose(3, 2, 0, 1))
        self._accumulate("b", dy2.sum(axis=0))
        self._grads_done()
        if not self.needs_input_grad:
            return None
        # dcols = dy @ W_mat.T, then col2im: each window offset adds back where it read.
        dcols = (dy2 @ self._w_mat.T).reshape(n, oh, ow, k, k, c)
        dx = self.xp.zeros((n, h + 2 * p, w + 2 * p, c), dtype=dy.dtype)
        for i in range(k):
            for j in range(k):
                dx[:, i : i + s * oh : s, j : j + s * ow : s, :] += dcols[:, :, :, i, j, :]
        return dx[:, p : p + h, p : p + w, :] if p else dx


class _Pool2d(Layer):
    """Shared geometry of max and average pooling (no padding, floor mode)."""

    def _infer(self, input_shape: Shape) -> Shape:
        _need_image(self.type, input_shape, "pool_size")
        c, h, w = input_shape
        k = self.spec.pool_size
        s = self.spec.stride or k
        if k > h or k > w:
            raise ShapeError(f"pool_size {k} is larger than the input {h}x{w}", "pool_size")
        self._geometry = (c, h, w, _out_size(h, k, s), _out_size(w, k, s), k, s)
        return (c, self._geometry[3], self._geometry[4])

    def flops(self) -> int:
        c, _, _, oh, ow, k, _ = self._geometry
        return c * oh * ow * k * k

    def _offsets(self, x: Any):
        """For each window offset ``(i, j)``: the strided view of x it reads, (N, OH, OW, C)."""
        _, _, _, oh, ow, k, s = self._geometry
        for i in range(k):
            for j in range(k):
                yield x[:, i : i + s * oh : s, j : j + s * ow : s, :]


class MaxPool2d(_Pool2d):
    """Max over each window; the gradient goes to the first maximum, as in PyTorch.

    x: (N, H, W, C) -> y: (N, OH, OW, C).
    """

    type = "maxpool2d"

    def forward(self, x: Any, training: bool) -> Any:
        xp = self.xp
        views = self._offsets(x)
        y = xp.array(next(views))
        for view in views:
            xp.maximum(y, view, out=y)
        self._x, self._y = x, y
        return y

    def backward(self, dy: Any) -> Any:
        xp = self.xp
        dx = xp.zeros_like(self._x)
        taken = xp.zeros(dy.shape, dtype=bool)
        for view, dview in zip(self._offsets(self._x), self._offsets(dx), strict=True):
            hit = view == self._y
            hit &= ~taken
            taken |= hit
            dview += xp.where(hit, dy, 0)
        return dx


class AvgPool2d(_Pool2d):
    """Mean over each window. x: (N, H, W, C) -> y: (N, OH, OW, C); dx = dy / (k*k) per window."""

    type = "avgpool2d"

    def forward(self, x: Any, training: bool) -> Any:
        xp = self.xp
        views = self._offsets(x)
        y = xp.array(next(views))
        for view in views:
            y += view
        y *= 1.0 / (self._geometry[5] ** 2)
        self._x_shape = x.shape
        return y

    def backward(self, dy: Any) -> Any:
        dx = self.xp.zeros(self._x_shape, dtype=dy.dtype)
        share = dy * (1.0 / (self._geometry[5] ** 2))
        for dview in self._offsets(dx):
            dview += share
        return dx


class GlobalAvgPool(Layer):
    """Mean over height and width. x: (N, H, W, C) -> y: (N, C)."""

    type = "global_avgpool"

    def _infer(self, input_shape: Shape) -> Shape:
        _need_image("global_avgpool", input_shape, "type")
        return (input_shape[0],)

    def forward(self, x: Any, training: bool) -> Any:
        self._x_shape = x.shape
        return x.mean(axis=(1, 2))

    def backward(self, dy: Any) -> Any:
        n, h, w, c = self._x_shape
        dx = self.xp.empty(self._x_shape, dtype=dy.dtype)
        dx[...] = (dy * (1.0 / (h * w)))[:, None, None, :]
        return dx


class Flatten(Layer):
    """(N, ...) -> (N, features), in PyTorch's channels-first order for images."""

    type = "flatten"

    def _infer(self, input_shape: Shape) -> Shape:
        return (int(np.prod(input_shape, dtype=np.int64)),)

    def flops(self) -> int:
        return 0

    def forward(self, x: Any, training: bool) -> Any:
        self._x_shape = x.shape
        if x.ndim == 4:  # (N, H, W, C) -> (N, C, H, W) order
            x = x.transpose(0, 3, 1, 2)
        return x.reshape(x.shape[0], -1)

    def backward(self, dy: Any) -> Any:
        if len(self._x_shape) == 4:
            n, h, w, c = self._x_shape
            return dy.reshape(n, c, h, w).transpose(0, 2, 3, 1)
        return dy.reshape(self._x_shape)
