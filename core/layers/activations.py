"""Elementwise activations and dropout; any shape, any layout."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from core.layers.base import Layer
from core.layers.conv import Workspace
from core.special import gelu_and_slope, take_where_negative


def _rows(x: Any) -> Any:
    """x as (batch, features): NumPy's maximum against a zero row runs as fast as a copy,
    while a scalar 0 (a zero-stride operand) takes its slow path."""
    return x.reshape(x.shape[0] if x.ndim > 1 else 1, math.prod(x.shape[1:]) if x.ndim > 1 else -1)


class ReLU(Layer):
    """y = max(x, 0); dx = dy * (x > 0).

    In training the mask ``x > 0`` is taken in the forward pass, while ``y`` is still
    in cache, and kept instead of ``y`` (a quarter of its bytes).
    """

    type = "relu"
    groupable = True

    def __init__(self, spec: Any) -> None:
        super().__init__(spec)
        self._work = Workspace()
        self._y: Any = None
        self._positive: Any = None

    def forward(self, x: Any, training: bool) -> Any:
        xp = self.xp
        self._y = self._positive = None  # so that the workspace can reuse last step's arrays
        self._work.batch(x.shape[0] if x.ndim else 1)
        y = self._work.output(xp, "y", x.shape, x.dtype)
        rows = _rows(x)
        zero = self._work.scratch(xp, "zero", rows.shape[1:], x.dtype, zero=True)
        xp.maximum(rows, zero, out=y.reshape(rows.shape))
        if training:
            self._positive = self._mask(y)
        else:  # backward is unlikely: take the mask only if asked
            self._y = y
        return y

    def _mask(self, y: Any) -> Any:
        positive = self._work.scratch(self.xp, "positive", y.shape, bool)
        self.xp.greater(y, 0, out=positive)
        return positive

    def backward(self, dy: Any) -> Any:
        xp = self.xp
        if self._positive is None:
            self._positive = self._mask(self._y)
        dx = self._work.output(xp, "dx", dy.shape, dy.dtype)
        xp.multiply(dy, self._positive, out=dx)
        return dx


class LeakyReLU(Layer):
    """y = x if x > 0 else a*x, computed as max(x, a*x) (0 <= a <= 1);
    dx = dy * (1 if x > 0 else a)."""

    type = "leaky_relu"
    groupable = True

    def forward(self, x: Any, training: bool) -> Any:
        self._x = x
        y = x * self.spec.negative_slope
        self.xp.maximum(x, y, out=y)
        return y

    def backward(self, dy: Any) -> Any:
        a = self.spec.negative_slope
        slope = (self._x > 0).astype(dy.dtype)
        slope *= 1.0 - a
        slope += a
        slope *= dy
        return slope


class Tanh(Layer):
    """y = tanh(x); dx = dy * (1 - y^2)."""

    type = "tanh"
    groupable = True

    def forward(self, x: Any, training: bool) -> Any:
        self._y = self.xp.tanh(x)
        return self._y

    def backward(self, dy: Any) -> Any:
        return dy * (1 - self._y * self._y)


def sigmoid(xp: Any, x: Any) -> Any:
    """Logistic function without overflow for large |x|: 1 / (1 + e) for x >= 0 and
    e / (1 + e) below, with e = exp(-|x|) (both 0.5 at -0.0)."""
    e = xp.exp(-xp.abs(x))
    denominator = 1 + e
    if xp is np and x.dtype.kind == "f" and x.ndim:
        positive = np.divide(1, denominator)
        negative = np.divide(e, denominator, out=e)
        return take_where_negative(np.ascontiguousarray(x), negative, positive, denominator)
    return xp.where(x >= 0, 1 / denominator, e / denominator)


class Sigmoid(Layer):
    """y = 1 / (1 + exp(-x)); dx = dy * y * (1 - y)."""

    type = "sigmoid"
    groupable = True

    def forward(self, x: Any, training: bool) -> Any:
        self._y = sigmoid(self.xp, x)
        return self._y

    def backward(self, dy: Any) -> Any:
        return dy * self._y * (1 - self._y)


class GELU(Layer):
    """Exact GELU, y = x * Phi(x) = x/2 * (1 + erf(x / sqrt 2)); dx = dy * (Phi(x) + x phi(x)).

    Phi comes from :func:`core.special.normal_cdf` (NumPy has no erf): exact to
    rounding in float64, within float32's resolution otherwise.
    """

    type = "gelu"
    groupable = True

    def forward(self, x: Any, training: bool) -> Any:
        y, self._dydx = gelu_and_slope(self.xp, x)
        return y

    def backward(self, dy: Any) -> Any:
        return dy * self._dydx


class Dropout(Layer):
    """Inverted dropout: y = x * mask / (1 - rate) while training, y = x otherwise.

    The mask is drawn from ``self.rng`` (set by the model from the training seed).
    """

    type = "dropout"

    def forward(self, x: Any, training: bool) -> Any:
        rate = self.spec.rate
        if not training or rate == 0.0:
            self._mask = None
            return x
        # float32 draws: half the bytes of float64, and resolution enough for a rate
        keep = self.rng.random(x.shape, dtype=np.float32) >= rate
        mask = keep.astype(x.dtype)
        mask *= 1.0 / (1.0 - rate)
        self._mask = self.xp.asarray(mask)
        return x * self._mask

    def backward(self, dy: Any) -> Any:
        return dy if self._mask is None else dy * self._mask
