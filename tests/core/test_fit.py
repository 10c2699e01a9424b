"""Training end to end: it learns, reports its metrics, and is reproducible."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from core import fit
from tests.factories import digits_job, digits_subset, example_job


@pytest.mark.slow
def test_digits_cnn_example_reaches_97_percent() -> None:
    result = fit(example_job("digits_cnn"))
    assert len(result.history) == 20
    assert result.test["test_accuracy"] >= 0.97
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]


@pytest.fixture(scope="module")
def small() -> Any:
    return digits_subset(300, n_test=100)


def test_metrics_of_each_epoch(small: Any) -> None:
    seen: list[int] = []
    steps: list[tuple[int, float]] = []
    job = digits_job(epochs=2, batch_size=32, validation_split=0.2)
    result = fit(
        job,
        small,
        on_epoch=lambda epoch, metrics: seen.append(epoch),
        on_step=lambda step, value: steps.append((step, value)),
    )
    assert seen == [1, 2]
    # 240 training samples in batches of 32: 8 steps per epoch
    assert [step for step, _ in steps] == list(range(1, 17))
    assert all(np.isfinite(value) for _, value in steps)
    for metrics in result.history:
        assert {
            "train_loss",
            "train_accuracy",
            "val_loss",
            "val_accuracy",
            "error_rate",
            "lr",
            "samples_per_s",
            "epoch_time_s",
            "grad_norm/1.dense",
            "grad_norm/3.dense",
            "update_ratio/1.dense",
            "update_ratio/3.dense",
        } <= set(metrics)
        assert metrics["error_rate"] == pytest.approx(1 - metrics["val_accuracy"])
        assert 0 <= metrics["val_accuracy"] <= 1 and metrics["lr"] == 0.01
        assert metrics["grad_norm/1.dense"] > 0 and metrics["update_ratio/1.dense"] > 0
    assert set(result.test) == {"test_loss", "test_accuracy"}


def test_same_seed_same_run_other_seed_other_run(small: Any) -> None:
    job = digits_job(epochs=1, batch_size=64)
    a, b = fit(job, small), fit(job, small)
    for name, value in a.trainer.state_dict().items():
        assert np.array_equal(value, b.trainer.state_dict()[name]), name
    c = fit(digits_job(epochs=1, batch_size=64, seed=1), small)
    assert not np.array_equal(
        a.trainer.state_dict()["model/1.W"], c.trainer.state_dict()["model/1.W"]
    )


def test_loss_falls_with_sgd_schedule_and_clipping(small: Any) -> None:
    job = digits_job(
        optimizer={
            "type": "sgd",
            "lr": 0.2,
            "momentum": 0.9,
            "schedule": {"type": "cosine", "warmup_steps": 4},
        },
        epochs=4,
        grad_clip_norm=1.0,
    )
    result = fit(job, small)
    losses = [m["train_loss"] for m in result.history]
    assert losses[-1] < 0.5 * losses[0]
    assert result.history[-1]["lr"] < result.history[0]["lr"]


def test_predict_gives_one_row_of_logits_per_sample(small: Any) -> None:
    result = fit(digits_job(epochs=1), small)
    outputs = result.trainer.predict(small.X[:7])
    assert outputs.shape == (7, 10) and np.isfinite(outputs).all()
    accuracy = result.trainer.evaluate(small.X_test, small.y_test).accuracy
    assert accuracy == pytest.approx(result.test["test_accuracy"])
