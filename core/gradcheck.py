"""Central finite-difference gradient checks, in float64."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from core.layers.base import Layer

EPS = 1e-6


def numeric_grad(f: Callable[[], float], array: np.ndarray, eps: float = EPS) -> np.ndarray:
    """d f / d array by central differences, perturbing ``array`` in place."""
    grad = np.zeros_like(array)
    flat, gflat = array.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        saved = flat[i]
        flat[i] = saved + eps
        plus = f()
        flat[i] = saved - eps
        minus = f()
        flat[i] = saved
        gflat[i] = (plus - minus) / (2 * eps)
    return grad


def max_relative_error(analytic: np.ndarray, numeric: np.ndarray) -> float:
    """max |a - n| / max(1e-8, |a| + |n|), elementwise."""
    scale = np.maximum(np.abs(analytic) + np.abs(numeric), 1e-8)
    return float(np.max(np.abs(analytic - numeric) / scale)) if analytic.size else 0.0


def check_layer(
    layer: Layer,
    x: np.ndarray,
    *,
    training: bool = True,
    before_forward: Callable[[], None] | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Relative errors of a layer's ``dx`` and parameter gradients against central differences.

    The layer must be built in float64. The scalar checked is ``sum(y * r)`` with a
    fixed random ``r``, so every output element contributes.
    """
    rng = np.random.default_rng(seed)

    def run() -> np.ndarray:
        if before_forward is not None:
            before_forward()
        return layer.forward(x, training)

    weights = rng.standard_normal(run().shape)

    def scalar() -> float:
        return float((run() * weights).sum())

    layer.zero_grad()
    run()
    dx = layer.backward(weights.copy())
    errors = {"x": max_relative_error(dx, numeric_grad(scalar, x))} if dx is not None else {}
    analytic = {name: np.array(g) for name, g in layer.grads.items()}
    for name, param in layer.params.items():
        errors[name] = max_relative_error(analytic[name], numeric_grad(scalar, param))
    return errors


def check_loss(
    fn: Callable[[Any, Any], tuple[float, Any]], outputs: np.ndarray, targets: np.ndarray
) -> float:
    """Relative error of a loss's d(loss)/d(outputs) against central differences."""
    _, analytic = fn(outputs, targets)
    numeric = numeric_grad(lambda: fn(outputs, targets)[0], outputs)
    return max_relative_error(np.asarray(analytic), numeric)
