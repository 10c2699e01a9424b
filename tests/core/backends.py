"""The engine on another array module, against NumPy: the same models, batches and steps.

Every layer type, loss and optimizer appears in one of :data:`CASES`. For each,
:func:`compare` builds a trainer on NumPy and one on the other module (the same
seeds, so the same initial weights and dropout masks, which are drawn on the
CPU), runs a few training steps on the same batches, and checks the losses,
outputs, weights, gradient norms and checkpoint of the second against the first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

import core
from core.backend import to_numpy
from core.spec import TrainingSpec

#: float32 results of two array modules differ by the order of their sums.
RTOL = 2e-4
ATOL = 2e-5
STEPS = 3
BATCH = 12


@dataclass(frozen=True)
class Case:
    spec: dict[str, Any]
    input_shape: tuple[int, ...]
    optimizer: dict[str, Any]
    #: "class" (an integer per sample), "token" (one per position), "real", "binary"
    targets: str = "class"
    classes: int | None = 4
    grad_clip_norm: float | None = None


def _dense_layers(*activations: dict[str, Any]) -> list[dict[str, Any]]:
    layers: list[dict[str, Any]] = []
    for activation in activations:
        layers += [{"type": "dense", "units": 8}, activation]
    return layers


CASES: dict[str, Case] = {
    "mlp": Case(
        {
            "layers": [
                *_dense_layers(
                    {"type": "relu"},
                    {"type": "leaky_relu", "negative_slope": 0.1},
                    {"type": "tanh"},
                    {"type": "sigmoid"},
                    {"type": "gelu"},
                ),
                {"type": "dropout", "rate": 0.25},
                {"type": "batchnorm"},
                {"type": "layernorm"},
                {"type": "dense", "units": 4},
            ],
            "loss": "softmax_cross_entropy",
        },
        (6,),
        {"type": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3},
        grad_clip_norm=1.0,
    ),
    "cnn": Case(
        {
            "layers": [
                {"type": "conv2d", "filters": 4, "kernel_size": 3, "padding": 1},
                {"type": "relu"},
                {"type": "maxpool2d", "pool_size": 2},  # the 2x2 fast path
                {"type": "conv2d", "filters": 6, "kernel_size": 3, "stride": 2, "padding": 1},
                {"type": "batchnorm"},
                {"type": "maxpool2d", "pool_size": 2, "stride": 1},  # the general path
                {"type": "avgpool2d", "pool_size": 2},
                {"type": "conv2d", "filters": 5, "kernel_size": 1},
                {"type": "global_avgpool"},
                {"type": "dense", "units": 4},
            ],
            "loss": "softmax_cross_entropy",
        },
        (2, 12, 12),
        {"type": "adam", "lr": 0.01},
    ),
    "flatten-mse": Case(
        {
            "layers": [
                {"type": "conv2d", "filters": 3, "kernel_size": 3},
                {"type": "tanh"},
                {"type": "flatten"},
                {"type": "dense", "units": 3},
            ],
            "loss": "mse",
        },
        (1, 6, 6),
        {"type": "adamw", "lr": 0.01, "weight_decay": 0.1},
        targets="real",
        classes=None,
    ),
    "bce": Case(
        {
            "layers": [
                {"type": "dense", "units": 5},
                {"type": "relu"},
                {"type": "dense", "units": 1},
            ],
            "loss": "binary_cross_entropy",
        },
        (7,),
        {"type": "sgd", "lr": 0.1},
        targets="binary",
        classes=None,
    ),
    "text-classifier": Case(
        {
            "layers": [
                {"type": "embedding", "vocab_size": 11, "dim": 8},
                {"type": "positional_embedding", "max_len": 6},
                {"type": "self_attention", "heads": 2},
                {"type": "layernorm"},
                {"type": "mean_pool"},
                {"type": "dense", "units": 4},
            ],
            "loss": "softmax_cross_entropy",
        },
        (6,),
        # Attention's key bias has no effect, so its gradient is rounding noise, which
        # Adam would scale up to steps of the learning rate: plain SGD here.
        {"type": "sgd", "lr": 0.1, "momentum": 0.9},
    ),
    "char-lm": Case(
        {
            "layers": [
                {"type": "embedding", "vocab_size": 11, "dim": 8},
                {"type": "positional_embedding", "max_len": 6},
                {"type": "transformer_block", "heads": 2},
                {"type": "self_attention", "heads": 2, "causal": True},
                {"type": "dense", "units": 11},
            ],
            "loss": "softmax_cross_entropy",
        },
        (6,),
        {"type": "sgd", "lr": 0.1, "momentum": 0.9},
        targets="token",
        classes=11,
    ),
}


def _batches(case: Case, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    first = case.spec["layers"][0]
    outputs = case.spec["layers"][-1]["units"]
    batches = []
    for _ in range(STEPS):
        if first["type"] == "embedding":
            x = rng.integers(0, first["vocab_size"], (BATCH, *case.input_shape))
        else:
            x = rng.standard_normal((BATCH, *case.input_shape)).astype(np.float32)
        if case.targets == "real":
            y = rng.standard_normal((BATCH, outputs)).astype(np.float32)
        elif case.targets == "binary":
            y = rng.integers(0, 2, (BATCH, outputs)).astype(np.float32)
        elif case.targets == "token":
            y = rng.integers(0, outputs, (BATCH, *case.input_shape))
        else:
            y = rng.integers(0, outputs, BATCH)
        batches.append((x, y))
    return batches


def trainer(case: Case, device: str = "cpu", threads: int = 1) -> core.Trainer:
    return core.Trainer(
        model_spec=case.spec,
        optimizer_spec=case.optimizer,
        training=TrainingSpec(batch_size=BATCH, seed=3, grad_clip_norm=case.grad_clip_norm),
        input_shape=case.input_shape,
        num_classes=case.classes,
        device=device,
        threads=threads,
    )


def _close(actual: Any, expected: Any, what: str) -> None:
    np.testing.assert_allclose(
        to_numpy(actual), to_numpy(expected), rtol=RTOL, atol=ATOL, err_msg=what
    )


def compare(case: Case, other: core.Trainer, seed: int = 0) -> None:
    """Train ``other`` and a NumPy trainer of ``case`` side by side, checking them at each step."""
    reference = trainer(case)
    assert reference.model.xp is np
    assert other.model.xp is not np
    initial = other.model.state_dict()
    for name, p in reference.model.state_dict().items():
        np.testing.assert_array_equal(initial[name], p, err_msg=name)
    for step, (x, y) in enumerate(_batches(case, seed)):
        _close(other.model.forward(x), reference.model.forward(x), f"eval outputs, step {step}")
        kwargs = {"steps_per_epoch": STEPS, "total_steps": STEPS, "diagnose": True}
        got = other.train_step(x, y, **kwargs)
        want = reference.train_step(x, y, **kwargs)
        assert got.samples == want.samples
        np.testing.assert_allclose(
            got.loss_sum, want.loss_sum, rtol=RTOL, err_msg=f"loss, step {step}"
        )
        for layer, pairs in reference._layer_params.items():
            for (p, g), (q, h) in zip(pairs, other._layer_params[layer], strict=True):
                _close(h, g, f"{layer} gradient, step {step}")
                _close(q, p, f"{layer} parameter, step {step}")
    got_metrics, want_metrics = other.epoch_diagnostics(), reference.epoch_diagnostics()
    assert got_metrics.keys() == want_metrics.keys()
    for key, value in want_metrics.items():
        np.testing.assert_allclose(got_metrics[key], value, rtol=1e-3, err_msg=key)
    # A checkpoint of ``other`` is plain NumPy and resumes on NumPy.
    state = other.state_dict()
    assert all(isinstance(v, np.ndarray) for v in state.values())
    resumed = trainer(case)
    resumed.load_state_dict(state)
    x, y = _batches(case, seed + 1)[0]
    kwargs = {"steps_per_epoch": STEPS, "total_steps": STEPS}
    _close(
        resumed.train_step(x, y, **kwargs).loss_sum,
        other.train_step(x, y, **kwargs).loss_sum,
        "resumed loss",
    )
    final = other.model.state_dict()
    for name, value in resumed.model.state_dict().items():
        _close(final[name], value, f"resumed {name}")
