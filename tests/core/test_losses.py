"""Losses: values by their definitions, gradients by central differences."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import core
from core.errors import SpecError
from core.gradcheck import check_loss, numeric_grad
from core.losses import LOSSES, check_loss_fits, correct_count, predictions

GRAD_RTOL = 1e-5
GRAD_ATOL = 1e-9

Draw = Callable[[np.random.Generator], tuple[np.ndarray, np.ndarray]]


def _sce(shape: tuple[int, ...]) -> Draw:
    return lambda r: (r.standard_normal(shape) * 2, r.integers(0, shape[-1], shape[:-1]))


def _mse(shape: tuple[int, ...]) -> Draw:
    return lambda r: (r.standard_normal(shape), r.standard_normal(shape))


def _bce(shape: tuple[int, ...]) -> Draw:
    return lambda r: (r.standard_normal(shape) * 2, (r.random(shape) > 0.5).astype(np.int64))


CASES: dict[str, tuple[str, Draw]] = {
    "softmax_cross_entropy-2d": ("softmax_cross_entropy", _sce((5, 4))),
    "softmax_cross_entropy-per-token-3d": ("softmax_cross_entropy", _sce((3, 4, 5))),
    "mse-2d": ("mse", _mse((4, 3))),
    "mse-3d": ("mse", _mse((2, 3, 4))),
    "binary_cross_entropy-one-output": ("binary_cross_entropy", _bce((6, 1))),
    "binary_cross_entropy-multi-label": ("binary_cross_entropy", _bce((4, 3))),
}


def test_every_loss_has_a_gradient_check() -> None:
    assert {name for name, _ in CASES.values()} == set(LOSSES)


@pytest.mark.parametrize("case_id", list(CASES))
def test_loss_gradient_matches_central_differences(case_id: str, rng: np.random.Generator) -> None:
    name, draw = CASES[case_id]
    outputs, targets = draw(rng)
    fn = LOSSES[name]
    value, analytic = fn(outputs, targets)
    assert isinstance(value, float)
    assert analytic.shape == outputs.shape
    numeric = numeric_grad(lambda: fn(outputs, targets)[0], outputs)
    np.testing.assert_allclose(analytic, numeric, rtol=GRAD_RTOL, atol=GRAD_ATOL)
    assert check_loss(fn, outputs, targets) < GRAD_RTOL


def _log_softmax(z: np.ndarray) -> np.ndarray:
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def test_softmax_cross_entropy_is_the_mean_negative_log_likelihood(
    rng: np.random.Generator,
) -> None:
    z = rng.standard_normal((6, 5))
    y = rng.integers(0, 5, 6)
    value, grad = core.loss("softmax_cross_entropy", z, y)
    assert value == pytest.approx(-_log_softmax(z)[np.arange(6), y].mean(), rel=1e-12)
    probabilities = np.exp(_log_softmax(z))
    np.testing.assert_allclose(grad, (probabilities - np.eye(5)[y]) / 6, rtol=1e-12)


def test_per_token_cross_entropy_averages_over_every_token(rng: np.random.Generator) -> None:
    z = rng.standard_normal((2, 3, 4))
    y = rng.integers(0, 4, (2, 3))
    value, grad = core.loss("softmax_cross_entropy", z, y)
    flat_value, flat_grad = core.loss("softmax_cross_entropy", z.reshape(6, 4), y.reshape(6))
    assert value == pytest.approx(flat_value, rel=1e-12)
    np.testing.assert_allclose(grad, flat_grad.reshape(2, 3, 4), rtol=1e-12)


def test_cross_entropy_is_stable_for_huge_logits() -> None:
    z = np.array([[1000.0, 0.0, -1000.0], [0.0, 1000.0, 0.0]])
    value, grad = core.loss("softmax_cross_entropy", z, np.array([0, 2]))
    assert value == pytest.approx(500.0)  # 0 for the first row, 1000 for the second
    assert np.isfinite(grad).all()
    np.testing.assert_allclose(grad, [[0, 0, 0], [0, 0.5, -0.5]], atol=1e-12)


def test_mse_value_and_gradient(rng: np.random.Generator) -> None:
    p, t = rng.standard_normal((4, 3)), rng.standard_normal((4, 3))
    value, grad = core.loss("mse", p, t)
    assert value == pytest.approx(((p - t) ** 2).mean(), rel=1e-12)
    np.testing.assert_allclose(grad, 2 * (p - t) / 12, rtol=1e-12)
    # Targets of shape (N,) meet a (N, 1) output.
    value_flat, _ = core.loss("mse", p[:, :1], t[:, 0])
    assert value_flat == pytest.approx(((p[:, 0] - t[:, 0]) ** 2).mean(), rel=1e-12)


def test_binary_cross_entropy_value_and_stability(rng: np.random.Generator) -> None:
    z = rng.standard_normal((5, 2)) * 3
    t = (rng.random((5, 2)) > 0.5).astype(np.int64)
    value, grad = core.loss("binary_cross_entropy", z, t)
    s = 1 / (1 + np.exp(-z))
    assert value == pytest.approx(-(t * np.log(s) + (1 - t) * np.log(1 - s)).mean(), rel=1e-10)
    np.testing.assert_allclose(grad, (s - t) / 10, rtol=1e-10)

    huge = np.array([[1000.0], [-1000.0], [1000.0]])
    value, grad = core.loss("binary_cross_entropy", huge, np.array([1, 0, 0]))
    assert value == pytest.approx(1000.0 / 3)
    np.testing.assert_allclose(grad, [[0.0], [0.0], [1 / 3]], atol=1e-12)


def test_unknown_loss_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown loss 'hinge'"):
        core.loss("hinge", np.zeros((1, 2)), np.zeros(1, dtype=np.int64))


@pytest.mark.parametrize(
    ("name", "outputs", "targets", "expected_predictions", "expected_count"),
    [
        ("softmax_cross_entropy", [[0.1, 2.0], [3.0, -1.0]], [1, 1], [1, 0], (1, 2)),
        ("binary_cross_entropy", [[0.5], [-0.2], [2.0]], [1, 1, 1], [1, 0, 1], (2, 3)),
        ("binary_cross_entropy", [[0.5, -1.0]], [[1, 1]], [[1, 0]], (1, 2)),
    ],
    ids=["softmax_cross_entropy", "binary-one-output", "binary-multi-label"],
)
def test_predictions_and_correct_count(
    name: str,
    outputs: list[Any],
    targets: list[Any],
    expected_predictions: list[Any],
    expected_count: tuple[int, int],
) -> None:
    out = np.array(outputs)
    np.testing.assert_array_equal(predictions(name, out), expected_predictions)
    assert correct_count(name, out, np.array(targets)) == expected_count


def test_regression_has_no_accuracy() -> None:
    assert correct_count("mse", np.zeros((2, 1)), np.zeros(2)) is None


# --- which outputs fit which targets -------------------------------------------------------

BATCH = 4
#: name -> (num_classes, label_shape): what a dataset's row says of its targets.
TARGETS: dict[str, tuple[int | None, tuple[int, ...]]] = {
    "10-classes": (10, ()),  # digits
    "binary": (2, ()),
    "per-token": (5, (6,)),  # a language model's corpus: the next token per position
    "real": (None, ()),  # an .npz upload with float y (N,)
    "real-vectors": (None, (3,)),  # ... with float y (N, 3)
}
OUTPUT_SHAPES = [(1,), (2,), (3,), (5,), (10,), (1, 10), (6,), (6, 1), (6, 5), (2, 3)]
#: Rejected though the arithmetic runs: the class count must be the dataset's (more logits
#: than classes run), and binary_cross_entropy's targets are 0/1.
STRICTER_THAN_ARITHMETIC = ("classes but the last layer gives", "needs 0/1 labels")


def _targets(kind: str, rng: np.random.Generator) -> np.ndarray:
    num_classes, label_shape = TARGETS[kind]
    if num_classes is None:
        return rng.standard_normal((BATCH, *label_shape)).astype(np.float32)
    return rng.integers(0, num_classes, size=(BATCH, *label_shape))


def _runs(name: str, output_shape: tuple[int, ...], targets: np.ndarray) -> bool:
    outputs = np.random.default_rng(0).standard_normal((BATCH, *output_shape))
    try:
        core.loss(name, outputs, targets)
    except (ValueError, IndexError):
        return False
    return True


@pytest.mark.parametrize("kind", list(TARGETS))
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_check_loss_fits_accepts_what_the_loss_can_compute(
    name: str, kind: str, rng: np.random.Generator
) -> None:
    """Every output shape the check accepts, the loss computes on such targets; what it
    refuses, the loss cannot compute, but for the documented stricter rules."""
    num_classes, label_shape = TARGETS[kind]
    targets = _targets(kind, rng)
    for output_shape in OUTPUT_SHAPES:
        runs = _runs(name, output_shape, targets)
        try:
            check_loss_fits(name, output_shape, num_classes, label_shape)
        except SpecError as exc:
            assert exc.loc == ("model", "loss") and exc.field == "loss"
            assert not runs or any(r in exc.reason for r in STRICTER_THAN_ARITHMETIC), (
                output_shape,
                exc.reason,
            )
        else:
            assert runs, f"{name} accepted {output_shape} on {kind} targets but cannot run"


@pytest.mark.parametrize(
    ("name", "output_shape", "kind"),
    [
        ("softmax_cross_entropy", (10,), "10-classes"),
        ("softmax_cross_entropy", (6, 5), "per-token"),
        ("mse", (1,), "10-classes"),  # a class index regressed as a number
        ("mse", (1,), "real"),
        ("mse", (3,), "real-vectors"),
        ("mse", (6, 1), "per-token"),
        ("binary_cross_entropy", (1,), "binary"),
        ("binary_cross_entropy", (3,), "real-vectors"),  # probabilities as targets
    ],
)
def test_combinations_that_train_are_accepted(
    name: str, output_shape: tuple[int, ...], kind: str
) -> None:
    check_loss_fits(name, output_shape, *TARGETS[kind])


@pytest.mark.parametrize(
    ("name", "output_shape", "kind", "words"),
    [
        ("mse", (10,), "10-classes", "to classify 10 classes use softmax_cross_entropy"),
        ("binary_cross_entropy", (10,), "10-classes", "10 classes: use softmax_cross_entropy"),
        ("binary_cross_entropy", (1,), "10-classes", "needs 0/1 labels"),
        ("binary_cross_entropy", (2,), "binary", "one output per 0/1 label"),
        ("softmax_cross_entropy", (2,), "real", "real numbers: use mse"),
        ("mse", (2,), "real-vectors", "targets (3,) per sample, so mse needs 3 outputs"),
        ("softmax_cross_entropy", (5,), "per-token", "needs logits (6, 5) per sample"),
    ],
)
def test_check_loss_fits_says_what_would_fit(
    name: str, output_shape: tuple[int, ...], kind: str, words: str
) -> None:
    with pytest.raises(SpecError) as info:
        check_loss_fits(name, output_shape, *TARGETS[kind])
    assert info.value.loc == ("model", "loss")
    assert words in str(info.value)


def test_check_loss_fits_without_knowing_the_targets_checks_only_the_outputs() -> None:
    """Callers that know only the classes (or nothing) are not refused what may fit."""
    check_loss_fits("mse", (10,), 10)
    check_loss_fits("softmax_cross_entropy", (5,), None)
    check_loss_fits("binary_cross_entropy", (3,), None)
