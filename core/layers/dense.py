"""Fully connected layer."""

from __future__ import annotations

from typing import Any

import numpy as np

from core.layers.base import Layer, Shape, ShapeError, init_weight, is_image


class Dense(Layer):
    """``y = x @ W + b`` on the last axis.

    x: (batch, ..., in_features) -> y: (batch, ..., units); W: (in, units), b: (units,).
    """

    type = "dense"
    has_weights = True
    groupable = True

    def _infer(self, input_shape: Shape) -> Shape:
        if is_image(input_shape):
            raise ShapeError(
                f"dense needs (features,) or (time, features), got an image {input_shape}; "
                "add a flatten or global_avgpool layer before it",
                "units",
            )
        if len(input_shape) == 0:
            raise ShapeError("dense needs at least one feature axis", "units")
        return (*input_shape[:-1], self.spec.units)

    def param_shapes(self) -> dict[str, Shape]:
        return {"W": (self.input_shape[-1], self.spec.units), "b": (self.spec.units,)}

    def flops(self) -> int:
        rows = int(np.prod(self.input_shape[:-1], dtype=np.int64))
        return rows * (2 * self.input_shape[-1] * self.spec.units + self.spec.units)

    def _initial_value(self, name: str, shape: Shape, rng: np.random.Generator, *, he: bool):
        return init_weight(shape, rng, he=he) if name == "W" else np.zeros(shape)

    # Leading axes are flattened into the rows of one matrix product: on (batch, time,
    # features) NumPy's matmul would otherwise run one small product per sample.

    def forward(self, x: Any, training: bool) -> Any:
        self._x = x
        y = self._grouped_matmul(x.reshape(-1, x.shape[-1]), self.params["W"])
        y += self.params["b"]
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def backward(self, dy: Any) -> Any:
        x = self._x
        x2 = x.reshape(-1, x.shape[-1])
        dy2 = dy.reshape(-1, dy.shape[-1])
        if self._groups is None:
            self._accumulate_matmul("W", x2.T, dy2)  # dW = x.T @ dy
            self._accumulate("b", dy2.sum(axis=0))  # db = sum(dy)
        else:
            rows = self._group_rows(len(x2))

            def weight(group: int, out: Any) -> None:
                lo, hi = rows[group]
                self.xp.matmul(x2[lo:hi].T, dy2[lo:hi], out=out)

            bias = self._group_sums(dy2)
            for tree, grads in zip(self._group_trees, self._group_grads, strict=True):
                self._tree_sum(tree, weight, grads["W"])
                self._tree_sum(tree, bias, grads["b"])
        self._grads_done()
        if not self.needs_input_grad:
            return None
        dx = self._grouped_matmul(dy2, self.params["W"].T)  # dx = dy @ W.T
        return dx.reshape(x.shape)
