"""Losses: each returns ``(loss, dlogits)``, the mean over the batch and its gradient."""

from __future__ import annotations

from typing import Any

from core.backend import array_module
from core.errors import SpecError
from core.layers.activations import sigmoid

Shape = tuple[int, ...]


def softmax_cross_entropy(logits: Any, labels: Any) -> tuple[float, Any]:
    """Fused softmax and cross-entropy over the last axis, integer labels.

    logits: (batch, classes) or (batch, time, classes); labels: (batch,) or (batch, time).
    loss = mean(logsumexp(z) - z[y]);  dz = (softmax(z) - onehot(y)) / count
    """
    xp = array_module(logits)
    classes = logits.shape[-1]
    z = logits.reshape(-1, classes)
    y = labels.reshape(-1)
    count = z.shape[0]
    shifted = z - z.max(axis=1, keepdims=True)
    exp = xp.exp(shifted)
    sum_exp = exp.sum(axis=1, keepdims=True)
    rows = xp.arange(count)
    log_prob_true = shifted[rows, y] - xp.log(sum_exp[:, 0])
    loss = -float(log_prob_true.mean())
    grad = exp
    grad /= sum_exp
    grad[rows, y] -= 1.0
    grad *= 1.0 / count
    return loss, grad.reshape(logits.shape)


def mse(predictions: Any, targets: Any) -> tuple[float, Any]:
    """Mean squared error over every element. loss = mean((p - t)^2); dp = 2 (p - t) / count."""
    diff = predictions - targets.reshape(predictions.shape)
    loss = float((diff * diff).mean())
    return loss, diff * (2.0 / diff.size)


def binary_cross_entropy(logits: Any, targets: Any) -> tuple[float, Any]:
    """Binary cross-entropy from logits, stable for any |z|.

    loss = mean(max(z, 0) - z*t + log(1 + exp(-|z|)));  dz = (sigmoid(z) - t) / count
    """
    xp = array_module(logits)
    t = targets.reshape(logits.shape).astype(logits.dtype)
    z = logits
    per_element = xp.maximum(z, 0) - z * t + xp.log1p(xp.exp(-xp.abs(z)))
    loss = float(per_element.mean())
    return loss, (sigmoid(xp, z) - t) * (1.0 / z.size)


LOSSES = {
    "softmax_cross_entropy": softmax_cross_entropy,
    "mse": mse,
    "binary_cross_entropy": binary_cross_entropy,
}


def loss(name: str, outputs: Any, targets: Any) -> tuple[float, Any]:
    """``(loss, doutputs)`` of the loss named ``name``, the mean over the batch."""
    try:
        fn = LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; expected one of {sorted(LOSSES)}") from None
    return fn(outputs, targets)


def check_loss_fits(name: str, output_shape: Shape, num_classes: int | None) -> None:
    """Raise :class:`SpecError` on ``loss`` when the model's output cannot feed it."""
    if name == "softmax_cross_entropy":
        if len(output_shape) not in (1, 2):
            raise SpecError(
                f"softmax_cross_entropy needs logits (classes,) or (time, classes) per sample, "
                f"but the last layer gives {output_shape}",
                field="loss",
            )
        if output_shape[-1] < 2:
            raise SpecError(
                f"softmax_cross_entropy needs at least 2 classes, the last layer gives "
                f"{output_shape[-1]}",
                field="loss",
            )
        if num_classes is not None and output_shape[-1] != num_classes:
            raise SpecError(
                f"the dataset has {num_classes} classes but the last layer gives "
                f"{output_shape[-1]} outputs",
                field="loss",
            )
    elif name == "binary_cross_entropy":
        if num_classes is not None and num_classes > 2 and output_shape[-1] != num_classes:
            raise SpecError(
                f"binary_cross_entropy on {num_classes} labels needs {num_classes} outputs, "
                f"the last layer gives {output_shape[-1]}",
                field="loss",
            )
        if num_classes is not None and num_classes <= 2 and output_shape != (1,):
            raise SpecError(
                f"binary_cross_entropy on a binary label needs one output, the last layer "
                f"gives {output_shape}",
                field="loss",
            )


def predictions(name: str, outputs: Any) -> Any:
    """Class per sample for classifiers (argmax, or threshold at logit 0), else the outputs."""
    xp = array_module(outputs)
    if name == "softmax_cross_entropy":
        return outputs.argmax(axis=-1)
    if name == "binary_cross_entropy":
        hits = outputs > 0
        return hits[..., 0].astype(xp.int64) if outputs.shape[-1] == 1 else hits.astype(xp.int64)
    return outputs


def correct_count(name: str, outputs: Any, targets: Any) -> tuple[int, int] | None:
    """``(right, predicted)``: how many predictions match their targets; None for regression."""
    if name == "mse":
        return None
    predicted = predictions(name, outputs)
    return int((predicted == targets.reshape(predicted.shape)).sum()), int(predicted.size)
