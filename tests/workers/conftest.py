"""The small jobs the worker tests train (one Ray for the session is in tests/conftest.py)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import ray

from core.data import Dataset
from tests.factories import STATEFUL_CNN, digits_subset
from workers.allreduce import backend_unavailable_reason
from workers.group import WorkerGroup

MLP = {
    "layers": [
        {"type": "flatten"},
        {"type": "dense", "units": 32},
        {"type": "relu"},
        {"type": "dense", "units": 10},
    ],
    "loss": "softmax_cross_entropy",
}

#: Convolution, batchnorm (running statistics) and dropout (per-slot random masks).
CNN = STATEFUL_CNN


def job_spec(model: dict[str, Any] = MLP, **training: Any) -> dict[str, Any]:
    """A small digits job; ``training`` overrides the training fields."""
    fields = {
        "epochs": 3,
        "batch_size": 40,
        "validation_split": 0.2,
        "seed": 7,
        "checkpoint_every_epochs": 1,
        "log_every_steps": 1,
    }
    fields.update(training)
    return {
        "name": "workers-test",
        "dataset": {"name": "digits"},
        "model": model,
        "optimizer": {"type": "adam", "lr": 0.01},
        "training": fields,
    }


def small_digits(n: int = 300) -> Dataset:
    """The first ``n`` digits (and the first 100 of the test split)."""
    return digits_subset(n)


@pytest.fixture(scope="session")
def digits() -> Dataset:
    return small_digits()


def timings_removed(metrics: dict[str, float]) -> dict[str, float]:
    return {
        k: v
        for k, v in metrics.items()
        if k not in ("samples_per_s", "epoch_time_s", "allreduce_time_s")
    }


def assert_same_weights(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    """Bit for bit (same names, shapes, dtypes and values)."""
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert np.array_equal(a[name], b[name]), name


def setup_job(
    group: WorkerGroup,
    dataset: Dataset,
    job: dict[str, Any],
    *,
    deterministic: bool = True,
    micro_shards: int = 4,
) -> None:
    """Set ``job`` up on every worker of ``group``, training on all of ``dataset``."""
    data = {
        "X_train": ray.put(dataset.X),
        "y_train": ray.put(dataset.y),
        "X_val": ray.put(dataset.X[:0]),
        "y_val": ray.put(dataset.y[:0]),
    }
    group.execute(
        "setup_job",
        job,
        data,
        input_shape=dataset.input_shape,
        num_classes=dataset.num_classes,
        deterministic=deterministic,
        micro_shards=micro_shards,
    )


def available(backend: str, *args: Any) -> Any:
    """A parameter set that skips, saying why, where ``backend`` cannot run."""
    reason = backend_unavailable_reason(backend)
    skip = pytest.mark.skipif(reason is not None, reason=f"{backend}: {reason}")
    return pytest.param(backend, *args, marks=skip, id="-".join(map(str, (backend, *args))))
