"""Losses: each returns ``(loss, dlogits)``, the mean over the batch and its gradient."""

from __future__ import annotations

import math
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


def check_loss_fits(
    name: str,
    output_shape: Shape,
    num_classes: int | None,
    label_shape: Shape | None = None,
) -> None:
    """Raise :class:`SpecError` on ``loss`` when the model's output cannot feed it.

    What is known of the dataset's targets: with ``num_classes``, integer class labels
    in [0, num_classes); ``label_shape`` is the shape of one sample's targets (``()``
    one per sample, ``(time,)`` one per token), None when unknown. Targets of a known
    shape without classes are real numbers (a regression).

    Per sample, targets of shape L: ``softmax_cross_entropy`` takes logits
    ``(*L, classes)`` and class labels only; ``mse`` takes as many outputs as targets,
    and so does ``binary_cross_entropy``, whose targets are 0/1 (or probabilities):
    never the labels of more than 2 classes.
    """
    if name == "softmax_cross_entropy":
        _check_softmax_fits(output_shape, num_classes, label_shape)
        return
    if name == "binary_cross_entropy" and num_classes is not None:
        if num_classes > 2:
            raise SpecError(
                f"binary_cross_entropy needs 0/1 labels, one output per label; this dataset "
                f"has {num_classes} classes: use softmax_cross_entropy with {num_classes} "
                f"outputs",
                field="loss",
            )
        if label_shape is None:
            label_shape = ()  # 2 classes: a label per sample (a vocabulary has more tokens)
    if label_shape is None or math.prod(output_shape) == math.prod(label_shape):
        return
    count = math.prod(label_shape)
    outputs = f"{count} output{'' if count == 1 else 's'} per sample"
    advice = ""
    if num_classes is None:
        reason = f"this dataset has {_per_sample(label_shape, 'target')}, so {name} needs {outputs}"
    elif name == "mse":
        reason = (
            f"this dataset has {_per_sample(label_shape, 'class label')}, which mse regresses "
            f"as a number, so it needs {outputs}"
        )
        advice = f"; to classify {num_classes} classes use softmax_cross_entropy"
    else:
        reason = f"binary_cross_entropy needs one output per 0/1 label, {outputs} here"
        advice = "; for 2 outputs use softmax_cross_entropy"
    raise SpecError(f"{reason}; the last layer gives {output_shape}{advice}", field="loss")


def _check_softmax_fits(
    output_shape: Shape, num_classes: int | None, label_shape: Shape | None
) -> None:
    if num_classes is None and label_shape is not None:
        raise SpecError(
            "softmax_cross_entropy needs integer class labels, but this dataset's targets "
            "are real numbers: use mse",
            field="loss",
        )
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
    # a row of logits per label: both are flattened, and must then pair up
    if label_shape is not None and math.prod(output_shape[:-1]) != math.prod(label_shape):
        logits = (*label_shape, num_classes or output_shape[-1])
        raise SpecError(
            f"this dataset has {_per_sample(label_shape, 'label')}, so softmax_cross_entropy "
            f"needs logits {logits} per sample, a row per label; the last layer gives "
            f"{output_shape}",
            field="loss",
        )
    if num_classes is not None and output_shape[-1] != num_classes:
        raise SpecError(
            f"the dataset has {num_classes} classes but the last layer gives "
            f"{output_shape[-1]} outputs",
            field="loss",
        )


def _per_sample(label_shape: Shape, what: str) -> str:
    """``"one label per sample"``, ``"labels (64,) per sample"``."""
    return f"one {what} per sample" if not label_shape else f"{what}s {label_shape} per sample"


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
