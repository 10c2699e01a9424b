from __future__ import annotations

import math
import os
import signal
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import ray

from core.data import Dataset, split_indices
from core.train import fit
from tests.workers.conftest import (
    CNN,
    MLP,
    assert_same_weights,
    available,
    job_spec,
    small_digits,
    timings_removed,
)
from workers.errors import (
    JobCancelledError,
    TooManyWorkerFailuresError,
    TrainingDivergedError,
)
from workers.trainer import JobEvent, JobResult, final_weights, run_job

pytestmark = pytest.mark.usefixtures("ray_session")


@dataclass
class Recorder:
    """Everything a job reports through its callbacks."""

    epochs: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    steps: list[tuple[int, float]] = field(default_factory=list)
    checkpoints: list[tuple[int, bytes]] = field(default_factory=list)
    events: list[JobEvent] = field(default_factory=list)

    def callbacks(self) -> dict[str, Any]:
        return {
            "on_epoch": lambda epoch, metrics: self.epochs.append((epoch, metrics)),
            "on_step": lambda step, loss: self.steps.append((step, loss)),
            "on_checkpoint": lambda epoch, data: self.checkpoints.append((epoch, data)),
            "on_event": self.events.append,
        }

    def kinds(self) -> list[str]:
        return [event.kind for event in self.events]

    def started(self) -> list[JobEvent]:
        return [event for event in self.events if event.kind == "group_started"]


@dataclass
class Run:
    result: JobResult
    record: Recorder

    @property
    def weights(self) -> dict[str, np.ndarray]:
        return final_weights(self.result.checkpoint)


def train(model: dict[str, Any], dataset: Dataset, workers: int, **options: Any) -> Run:
    record = Recorder()
    job = job_spec(model, **options.pop("training", {}))
    result = run_job(job, dataset, num_workers=workers, **record.callbacks(), **options)
    return Run(result, record)


def assert_same_run(a: Run, b: Run) -> None:
    assert_same_weights(a.weights, b.weights)
    assert [e for e, _ in a.record.epochs] == [e for e, _ in b.record.epochs]
    for (_, ma), (_, mb) in zip(a.record.epochs, b.record.epochs, strict=True):
        assert timings_removed(ma) == timings_removed(mb)
    assert a.record.steps == b.record.steps
    assert a.result.test == b.result.test


@pytest.fixture(scope="module")
def reference(digits: Dataset) -> Run:
    """The MLP job on one worker, uninterrupted."""
    return train(MLP, digits, 1)


@pytest.mark.parametrize("model", [MLP, CNN], ids=["mlp", "cnn"])
def test_weights_and_metrics_do_not_depend_on_the_number_of_workers(
    model: dict[str, Any], digits: Dataset, reference: Run
) -> None:
    runs = {n: train(model, digits, n, training={"epochs": 2}) for n in (1, 2, 4)}
    if model is MLP:
        runs[3] = train(model, digits, 3, training={"epochs": 2})
    for n, run in runs.items():
        assert len(run.record.started()[0].data["pids"]) == n
        assert_same_run(runs[1], run)
    metrics = runs[1].record.epochs[-1][1]
    assert all(math.isfinite(v) for v in metrics.values())
    assert {"train_loss", "val_loss", "val_accuracy", "error_rate", "allreduce_time_s"} <= set(
        metrics
    )


def test_a_batch_shorter_than_the_micro_shards_gives_the_same_weights(digits: Dataset) -> None:
    """240 training samples in batches of 47: the last 5 leave 3 of the 8 micro-shards
    empty. Full batches are added up along the tree inside each worker's backward,
    the short one slot by slot; either way the bits do not depend on the workers."""
    runs = [train(MLP, digits, n, training={"epochs": 1, "batch_size": 47}) for n in (1, 2)]
    assert_same_run(runs[0], runs[1])


def test_a_model_with_layernorm_gives_the_same_weights(digits: Dataset) -> None:
    """Layernorm runs a worker's micro-shards as one batch too (per-row statistics)."""
    layers = [*MLP["layers"][:2], {"type": "layernorm"}, *MLP["layers"][2:]]
    model = {**MLP, "layers": layers}
    runs = [train(model, digits, n, training={"epochs": 1}) for n in (1, 2)]
    assert_same_run(runs[0], runs[1])


def test_same_metric_names_as_fit_and_close_values(digits: Dataset, reference: Run) -> None:
    single = fit(job_spec(MLP), digits)
    ours = [metrics for _, metrics in reference.record.epochs]
    assert len(ours) == len(single.history) == 3
    for mine, theirs in zip(ours, single.history, strict=True):
        assert set(mine) - set(theirs) == {"allreduce_time_s"}
        assert set(theirs) <= set(mine)
        for name in timings_removed(theirs):
            assert mine[name] == pytest.approx(theirs[name], rel=1e-3, abs=1e-4), name
    for name, value in single.model.state_dict().items():
        np.testing.assert_allclose(reference.weights[name], value, rtol=1e-3, atol=1e-5)
    assert set(reference.result.test) == {"test_loss", "test_accuracy"}


def test_reports_once_per_epoch_step_and_checkpoint(reference: Run) -> None:
    record = reference.record
    assert [e for e, _ in record.epochs] == [1, 2, 3]
    assert [e for e, _ in record.checkpoints] == [1, 2, 3]
    steps_per_epoch = math.ceil(240 / 40)
    assert [s for s, _ in record.steps] == list(range(1, 3 * steps_per_epoch + 1))
    assert record.kinds() == ["group_started"]
    assert reference.result.checkpoint == record.checkpoints[-1][1]


def test_a_worker_killed_mid_epoch_is_replaced_and_nothing_changes(
    digits: Dataset, reference: Run
) -> None:
    killed: list[int] = []
    record = Recorder()
    callbacks = record.callbacks()

    def on_step(step: int, loss: float) -> None:
        record.steps.append((step, loss))
        if step == 8 and not killed:  # in the middle of the second epoch
            pid = record.started()[0].data["pids"][1]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    callbacks["on_step"] = on_step
    result = run_job(job_spec(MLP), digits, num_workers=2, max_failures=1, **callbacks)
    assert killed
    assert record.kinds() == ["group_started", "worker_failed", "group_started"]
    failure = record.events[1]
    assert failure.data["rank"] == 1 and failure.epoch == 1
    assert result.worker_failures == 1
    assert_same_run(Run(result, record), reference)
    assert [e for e, _ in record.checkpoints] == [1, 2, 3]


def test_more_failures_than_allowed_fail_the_job(digits: Dataset) -> None:
    record = Recorder()
    callbacks = record.callbacks()

    def on_step(step: int, loss: float) -> None:
        if step == 2:
            os.kill(record.started()[-1].data["pids"][0], signal.SIGKILL)

    callbacks["on_step"] = on_step
    with pytest.raises(TooManyWorkerFailuresError, match="max_failures=0"):
        run_job(job_spec(MLP), digits, num_workers=2, max_failures=0, **callbacks)
    assert record.kinds() == ["group_started", "worker_failed"]


def test_resume_from_a_checkpoint_finishes_like_an_uninterrupted_run(
    digits: Dataset, reference: Run
) -> None:
    first_epoch = reference.record.checkpoints[0][1]
    run = train(MLP, digits, 2, resume=first_epoch)
    assert [e for e, _ in run.record.epochs] == [2, 3]
    assert_same_weights(run.weights, reference.weights)
    for (_, mine), (_, theirs) in zip(run.record.epochs, reference.record.epochs[1:], strict=True):
        assert timings_removed(mine) == timings_removed(theirs)


def poisoned_digits(seed: int) -> tuple[Dataset, int]:
    """Digits with one training sample (after the validation split) set to infinity."""
    clean = small_digits()
    train_idx, _ = split_indices(len(clean.X), 0.2, seed)
    X = clean.X.copy()
    X[train_idx[17], 0, 3, 3] = np.inf
    return Dataset(
        name="digits",
        X=X,
        y=clean.y,
        input_shape=clean.input_shape,
        num_classes=clean.num_classes,
    ), int(train_idx[17])


def test_a_non_finite_loss_rolls_back_and_skips_the_batch() -> None:
    dataset, _ = poisoned_digits(seed=7)
    run = train(MLP, dataset, 2, training={"epochs": 2}, max_divergences=3)
    kinds = run.record.kinds()
    # The poisoned sample lies in one batch of each epoch.
    assert kinds == ["group_started", "diverged", "restored", "diverged", "restored"]
    assert [e.epoch for e in run.record.events if e.kind == "diverged"] == [0, 1]
    assert run.result.divergences == 2
    assert [e for e, _ in run.record.epochs] == [1, 2]
    for _, metrics in run.record.epochs:
        assert all(math.isfinite(v) for v in metrics.values())
    for value in run.weights.values():
        assert np.isfinite(value).all()
    steps_per_epoch = math.ceil(240 / 40)
    assert run.result.steps == 2 * steps_per_epoch - 2  # one batch skipped per epoch


def test_repeated_divergence_fails_the_job_with_the_reason() -> None:
    dataset, _ = poisoned_digits(seed=7)
    record = Recorder()
    with pytest.raises(TrainingDivergedError, match="non-finite") as failure:
        run_job(job_spec(MLP), dataset, num_workers=2, max_divergences=2, **record.callbacks())
    assert failure.value.count == 2
    assert record.kinds().count("diverged") == 2


def test_cancel_stops_at_the_next_step_and_releases_every_actor(digits: Dataset) -> None:
    record = Recorder()
    callbacks = record.callbacks()
    cancel = {"requested": False}

    def on_step(step: int, loss: float) -> None:
        record.steps.append((step, loss))
        if step == 4:
            cancel["requested"] = True

    callbacks["on_step"] = on_step
    with pytest.raises(JobCancelledError) as cancelled:
        run_job(
            job_spec(MLP),
            digits,
            num_workers=3,
            should_cancel=lambda: cancel["requested"],
            **callbacks,
        )
    assert cancelled.value.step == 4
    assert [s for s, _ in record.steps] == [1, 2, 3, 4]
    assert record.kinds() == ["group_started", "cancelled"]
    for name in record.started()[0].data["actor_names"]:
        with pytest.raises((ValueError, ray.exceptions.RayActorError)):
            ray.get(ray.get_actor(name).ping.remote(), timeout=30)


@pytest.mark.parametrize("backend", [available("gloo")])
def test_gloo_backend_gives_the_same_weights(backend: str, digits: Dataset, reference: Run) -> None:
    run = train(MLP, digits, 2, backend=backend)
    assert_same_run(run, reference)


def test_fast_mode_trains(digits: Dataset, reference: Run) -> None:
    run = train(MLP, digits, 2, deterministic=False)
    losses = [metrics["train_loss"] for _, metrics in run.record.epochs]
    assert losses[-1] < losses[0]
    reference_losses = [metrics["train_loss"] for _, metrics in reference.record.epochs]
    np.testing.assert_allclose(losses, reference_losses, rtol=1e-3)
