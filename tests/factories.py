"""Small specs, layers, models and datasets shared by the tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from core.data import Dataset, load_digits
from core.layers import LAYERS, Layer
from core.spec import parse_model_spec

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def layer_spec(spec: dict[str, Any]) -> Any:
    """The validated spec object of one layer."""
    return parse_model_spec({"layers": [spec], "loss": "mse"}).layers[0]


def make_layer(
    spec: dict[str, Any],
    input_shape: tuple[int, ...],
    *,
    rng: np.random.Generator | None = None,
    dtype: Any = np.float64,
    first: bool = False,
) -> Layer:
    """A layer built in float64 for ``input_shape`` (per sample, channels-first).

    With ``rng`` every parameter is moved off its initial value (gamma off 1,
    biases off 0), so a gradient check cannot pass by symmetry.
    """
    parsed = layer_spec(spec)
    layer = LAYERS[parsed.type](parsed)
    layer.infer(input_shape)
    layer.init(np, dtype, np.random.default_rng(0), he=False)
    layer.needs_input_grad = not first
    if rng is not None:
        for key, value in layer.params.items():
            layer.params[key] = value + 0.1 * rng.standard_normal(value.shape).astype(dtype)
    return layer


def engine_batch(rng: np.random.Generator, input_shape: tuple[int, ...], batch: int) -> np.ndarray:
    """A random float64 batch in the layout layers see: images channels-last (N, H, W, C)."""
    if len(input_shape) == 3:
        c, h, w = input_shape
        return rng.standard_normal((batch, h, w, c))
    return rng.standard_normal((batch, *input_shape))


def nchw_to_nhwc(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


def nhwc_to_nchw(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def tiny_cnn_spec(*, filters: int = 3, classes: int = 4) -> dict[str, Any]:
    """conv-relu-maxpool-flatten-dense, small enough for a whole-model gradient check."""
    return {
        "layers": [
            {"type": "conv2d", "filters": filters, "kernel_size": 3, "padding": 1},
            {"type": "relu"},
            {"type": "maxpool2d", "pool_size": 2},
            {"type": "flatten"},
            {"type": "dense", "units": classes},
        ],
        "loss": "softmax_cross_entropy",
    }


def example_job(name: str = "digits_cnn") -> dict[str, Any]:
    return json.loads((EXAMPLES / f"{name}.json").read_text())


def digits_job(
    model: dict[str, Any] | None = None,
    *,
    optimizer: dict[str, Any] | None = None,
    **training: Any,
) -> dict[str, Any]:
    """A job on digits: by default a small MLP, Adam, 2 epochs."""
    settings = {"epochs": 2, "batch_size": 32, "validation_split": 0.2, "seed": 0}
    settings.update(training)
    return {
        "name": "digits-test",
        "dataset": {"name": "digits"},
        "model": model
        or {
            "layers": [
                {"type": "flatten"},
                {"type": "dense", "units": 16},
                {"type": "relu"},
                {"type": "dense", "units": 10},
            ],
            "loss": "softmax_cross_entropy",
        },
        "optimizer": optimizer or {"type": "adam", "lr": 0.01},
        "training": settings,
    }


#: Convolution, batchnorm (running statistics), dropout (random masks) and, with Adam,
#: optimizer moments: a resume or a reduction that lost any of them would diverge.
STATEFUL_CNN = {
    "layers": [
        {"type": "conv2d", "filters": 4, "kernel_size": 3, "padding": 1},
        {"type": "batchnorm"},
        {"type": "relu"},
        {"type": "maxpool2d", "pool_size": 2},
        {"type": "flatten"},
        {"type": "dropout", "rate": 0.3},
        {"type": "dense", "units": 10},
    ],
    "loss": "softmax_cross_entropy",
}


def digits_subset(n_train: int, n_test: int = 100) -> Dataset:
    """The first samples of digits' training pool and test split, to keep training short."""
    full = load_digits()
    assert full.X_test is not None and full.y_test is not None
    return Dataset(
        name="digits",
        X=full.X[:n_train],
        y=full.y[:n_train],
        input_shape=full.input_shape,
        num_classes=full.num_classes,
        class_names=full.class_names,
        X_test=full.X_test[:n_test],
        y_test=full.y_test[:n_test],
    )
