"""Elementwise activations and dropout; any shape, any layout."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from core.layers.base import Layer
from core.layers.conv import Workspace


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

    def forward(self, x: Any, training: bool) -> Any:
        self._y = self.xp.tanh(x)
        return self._y

    def backward(self, dy: Any) -> Any:
        return dy * (1 - self._y * self._y)


def sigmoid(xp: Any, x: Any) -> Any:
    """Logistic function without overflow for large |x|."""
    e = xp.exp(-xp.abs(x))
    return xp.where(x >= 0, 1 / (1 + e), e / (1 + e))


class Sigmoid(Layer):
    """y = 1 / (1 + exp(-x)); dx = dy * y * (1 - y)."""

    type = "sigmoid"

    def forward(self, x: Any, training: bool) -> Any:
        self._y = sigmoid(self.xp, x)
        return self._y

    def backward(self, dy: Any) -> Any:
        return dy * self._y * (1 - self._y)


# erf by Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7, below float32's resolution).
# NumPy has no erf; the backward differentiates this same formula, so the two agree.
_ERF_P = 0.3275911
_ERF_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)
_SQRT_HALF = math.sqrt(0.5)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _erf_and_derivative(xp: Any, z: Any) -> tuple[Any, Any]:
    """erf(z) and its derivative, both from the A&S 7.1.26 formula (odd in z)."""
    a = xp.abs(z)
    t = 1.0 / (1.0 + _ERF_P * a)
    a1, a2, a3, a4, a5 = _ERF_A
    poly = t * (a1 + t * (a2 + t * (a3 + t * (a4 + t * a5))))
    dpoly_dt = a1 + t * (2 * a2 + t * (3 * a3 + t * (4 * a4 + t * 5 * a5)))
    g = xp.exp(-a * a)
    erf_abs = 1.0 - poly * g
    # d/da [1 - P(t) e^{-a^2}] = e^{-a^2} (P'(t) p t^2 + 2 a P(t)); even in z
    derf = g * (dpoly_dt * _ERF_P * t * t + 2.0 * a * poly)
    return xp.copysign(erf_abs, z), derf


class GELU(Layer):
    """Exact GELU, y = x * Phi(x) = x/2 * (1 + erf(x / sqrt 2)); dx = dy * (Phi(x) + x * phi(x))."""

    type = "gelu"

    def forward(self, x: Any, training: bool) -> Any:
        erf, derf = _erf_and_derivative(self.xp, x * _SQRT_HALF)
        cdf = 0.5 * (1.0 + erf)
        self._dydx = cdf + x * (0.5 * _SQRT_HALF) * derf
        return x * cdf

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
