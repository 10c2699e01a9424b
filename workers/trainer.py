"""One training job on a worker group: epochs, validation, checkpoints, faults.

:func:`run_job` is the distributed counterpart of :func:`core.train.fit`. It
reports through callbacks and never touches a database or the artifact store:
per-epoch metrics (the names of ``fit`` plus ``allreduce_time_s``), the loss
every ``log_every_steps`` steps, checkpoints as ``.npz`` bytes, and events.

Faults:

- A worker that dies (or hangs in the all-reduce) tears the group down; a new
  group resumes from the last checkpoint, up to ``max_failures`` times.
  Epochs and steps redone after a restore are not reported again; in
  deterministic mode they are the same numbers anyway.
- A non-finite loss or gradient (the all-reduced sum, so every rank agrees)
  rolls the group back to the last good checkpoint and skips that batch from
  then on; the ``max_divergences``-th time fails the job.
- ``should_cancel`` is asked at every step boundary (and every ``0.1`` s
  within a long step, or while a group waits for its resources); when it answers
  true every actor is killed and :class:`JobCancelledError` is raised.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

import numpy as np
import ray

from core.checkpoint import from_npz_bytes, split_prefix
from core.data import Dataset, split_indices
from core.spec import JobSpec, parse_job_spec
from core.train import BatchStats
from workers.allreduce import BACKENDS, backend_unavailable_reason
from workers.config import MAX_DIVERGENCES, MAX_WORKER_FAILURES, MICRO_SHARDS
from workers.errors import (
    BackendUnavailableError,
    JobCancelledError,
    TooManyWorkerFailuresError,
    TrainingDivergedError,
    WorkerFailedError,
)
from workers.group import PlacementStrategy, StopRequested, WorkerGroup
from workers.worker import EpochReport, StepResult

logger = logging.getLogger(__name__)

Metrics = dict[str, float]


@dataclass(frozen=True)
class JobEvent:
    """Something the dispatcher may want to record.

    ``kind`` is one of ``group_started``, ``worker_failed``, ``diverged``,
    ``restored`` (rolled back after a divergence) and ``cancelled``; ``epoch``
    and ``step`` count the epochs and optimizer steps completed when it happened.
    """

    kind: str
    epoch: int
    step: int
    message: str
    data: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class JobResult:
    """What a finished job hands back (its metrics were reported as they came)."""

    history: tuple[Metrics, ...]
    test: Metrics
    checkpoint: bytes
    epochs: int
    steps: int
    worker_failures: int
    divergences: int


def run_job(
    job: JobSpec | dict[str, Any],
    dataset: Dataset,
    *,
    on_epoch: Callable[[int, Metrics], None] | None = None,
    on_step: Callable[[int, float], None] | None = None,
    on_checkpoint: Callable[[int, bytes], None] | None = None,
    on_event: Callable[[JobEvent], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    resume: bytes | None = None,
    max_failures: int = MAX_WORKER_FAILURES,
    max_divergences: int = MAX_DIVERGENCES,
    num_workers: int | None = None,
    deterministic: bool = True,
    micro_shards: int = MICRO_SHARDS,
    backend: str = "ray",
    placement_strategy: PlacementStrategy = "PACK",
    resources_per_worker: Mapping[str, float] | Sequence[Mapping[str, float]] | None = None,
) -> JobResult:
    """Train ``job`` on ``dataset`` with ``num_workers`` (default: the job's) Ray actors.

    ``on_epoch(epoch, metrics)`` fires exactly once per epoch (1-based, as
    ``fit``), ``on_step(step, loss)`` every ``training.log_every_steps`` steps,
    ``on_checkpoint(epoch, npz_bytes)`` every ``checkpoint_every_epochs`` and at
    the end. ``should_cancel`` must be cheap: it is called at every step.
    ``resume`` is a checkpoint to start from. Deterministic mode (the default)
    gives bit-identical weights and metrics (timings aside) for any number of
    workers; it cuts every batch into ``micro_shards`` pieces.

    Raises :class:`JobCancelledError`, :class:`TrainingDivergedError`,
    :class:`TooManyWorkerFailuresError`, or a startup error of the group.
    """
    run = _JobRun(
        job=parse_job_spec(job),
        dataset=dataset,
        on_epoch=on_epoch,
        on_step=on_step,
        on_checkpoint=on_checkpoint,
        on_event=on_event,
        should_cancel=should_cancel,
        max_failures=max_failures,
        max_divergences=max_divergences,
        num_workers=num_workers,
        deterministic=deterministic,
        micro_shards=micro_shards,
        backend=backend,
        placement_strategy=placement_strategy,
        resources_per_worker=resources_per_worker,
    )
    return run.run(resume)


#: Calls made to the workers ahead of the one being waited for, plus that one.
CALLS_IN_FLIGHT = 2
#: Work asked of the workers per call, and the most steps in one call: a cancel
#: request waits for the calls in flight.
CALL_TARGET_S = 0.1
MAX_STEPS_PER_CALL = 8


def steps_per_call(step_seconds: float) -> int:
    """Steps to ask per call when a step takes ``step_seconds``: about
    ``CALL_TARGET_S`` of work, at least one, at most ``MAX_STEPS_PER_CALL``."""
    return max(1, min(MAX_STEPS_PER_CALL, int(CALL_TARGET_S / max(step_seconds, 1e-6))))


class _Rollback(Exception):
    """The group must go back to the last good checkpoint."""


@dataclass(kw_only=True)
class _JobRun:
    """The state of one call of :func:`run_job` (the arguments are documented there)."""

    job: JobSpec
    dataset: Dataset
    on_epoch: Callable[[int, Metrics], None] | None
    on_step: Callable[[int, float], None] | None
    on_checkpoint: Callable[[int, bytes], None] | None
    on_event: Callable[[JobEvent], None] | None
    should_cancel: Callable[[], bool] | None
    max_failures: int
    max_divergences: int
    num_workers: int | None
    deterministic: bool
    micro_shards: int
    backend: str
    placement_strategy: PlacementStrategy
    resources_per_worker: Mapping[str, float] | Sequence[Mapping[str, float]] | None
    # What happened so far; ``epoch`` and ``step`` count what is completed.
    group: WorkerGroup | None = None
    history: list[Metrics] = field(default_factory=list)
    epoch: int = 0
    step: int = 0
    reported_epoch: int = 0
    reported_step: int = 0
    checkpointed_epoch: int = 0
    failures: int = 0
    divergences: int = 0
    skipped: set[tuple[int, int]] = field(default_factory=set)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(
                f"unknown all-reduce backend {self.backend!r}; expected one of {BACKENDS}"
            )
        # The driver need not have the workers' devices; the workers check those.
        reason = backend_unavailable_reason(self.backend, check_devices=False)
        if reason is not None:
            raise BackendUnavailableError(reason)
        if self.micro_shards < 1:
            raise ValueError("micro_shards must be at least 1")
        self.spec = self.job.training
        self.world_size = self.num_workers or self.job.resources.workers

    # --- the loop ---------------------------------------------------------------------------

    def run(self, resume: bytes | None) -> JobResult:
        spec = self.spec
        train_idx, val_idx = split_indices(len(self.dataset.X), spec.validation_split, spec.seed)
        X, y = self.dataset.X, self.dataset.y
        arrays = {
            "X_train": X[train_idx],
            "y_train": y[train_idx],
            "X_val": X[val_idx],
            "y_val": y[val_idx],
        }
        if self.dataset.X_test is not None and self.dataset.y_test is not None:
            arrays["X_test"], arrays["y_test"] = self.dataset.X_test, self.dataset.y_test
        # Once per job: every worker (and every restarted group) reads these in place.
        self.data = {name: ray.put(array) for name, array in arrays.items()}
        self.n_train = len(train_idx)
        self.steps_per_epoch = -(-self.n_train // spec.batch_size)
        self.last_good: bytes | None = resume
        self.last_good_ref = ray.put(resume) if resume is not None else None
        try:
            while True:
                try:
                    if self.group is None:
                        self._check_cancel()
                        self._start_group()
                    self._train()
                    test = self._finish()
                    break
                except WorkerFailedError as exc:
                    self._on_worker_failure(exc)
                except _Rollback:
                    self._restore()
        except StopRequested:
            self._stop_group()
            self._emit("cancelled", "cancelled by the caller")
            raise JobCancelledError(epoch=self.epoch, step=self.step) from None
        finally:
            self._stop_group()
        assert self.last_good is not None
        return JobResult(
            history=tuple(self.history),
            test=test,
            checkpoint=self.last_good,
            epochs=self.epoch,
            steps=self.step,
            worker_failures=self.failures,
            divergences=self.divergences,
        )

    def _start_group(self) -> None:
        resources = self.job.resources
        gpu = resources.device == "gpu"
        group = WorkerGroup.start(
            self.world_size,
            num_cpus_per_worker=1.0,
            num_gpus_per_worker=1.0 if gpu else 0.0,
            resources_per_worker=self.resources_per_worker,
            placement_strategy=self.placement_strategy,
            should_stop=self._cancel_requested,  # a job that cannot be placed can be cancelled
        )
        self.group = group
        positions = group.execute(
            "setup_job",
            self.job.model_dump(mode="json"),
            self.data,
            input_shape=tuple(self.dataset.input_shape),
            num_classes=self.dataset.num_classes,
            deterministic=self.deterministic,
            micro_shards=self.micro_shards,
            checkpoint=self.last_good_ref,
            dataset_meta=dict(self.dataset.meta),
        )
        num_slots = self.micro_shards if self.deterministic else self.world_size
        group.setup_allreduce(self.backend, num_slots=num_slots)
        self.epoch, self.step, _ = positions[0]
        if self.last_good is None:
            self._set_last_good(group.execute_on(0, "save"))
        status = group.status()
        self._emit(
            "group_started",
            f"{group.num_workers} workers on {status.num_nodes} node(s)",
            pids=[w.pid for w in status.workers],
            node_ids=[w.node_id for w in status.workers],
            actor_names=[w.actor_name for w in status.workers],
        )

    def _train(self) -> None:
        spec = self.spec
        while self.epoch < spec.epochs:
            epoch = self.epoch
            totals = BatchStats()
            started = time.perf_counter()
            # Steps go to the workers a few per call (about CALL_TARGET_S of work), and
            # the next call is made before the last one is answered, so a worker never
            # waits for the round trip to this process. A step that diverged rolls back
            # to a checkpoint, so steps after it that were already asked for change
            # nothing.
            todo = [b for b in range(self.steps_per_epoch) if (epoch, b) not in self.skipped]
            in_flight: deque[tuple[list[int], list[Any]]] = deque()
            per_call, position = 1, 0
            while position < len(todo) or in_flight:
                if position < len(todo):
                    self._check_cancel()
                    assert self.group is not None
                    chunk = todo[position : position + per_call]
                    position += len(chunk)
                    in_flight.append((chunk, self.group.submit("train_steps", epoch, chunk)))
                    if len(in_flight) < CALLS_IN_FLIGHT and position < len(todo):
                        continue
                per_call = self._take_steps(epoch, *in_flight.popleft(), totals)
            elapsed = time.perf_counter() - started
            self._check_cancel()
            assert self.group is not None
            reports = self.group.execute(
                "finish_epoch", epoch, evaluate=True, should_stop=self._cancel_requested
            )
            if not reports[0].weights_finite:
                done = [b for b in range(self.steps_per_epoch) if (epoch, b) not in self.skipped]
                self._diverged(epoch, done[-1], "non-finite weights after the epoch's last step")
            self.epoch = epoch + 1
            metrics = _epoch_metrics(reports[0], totals, elapsed)
            if self.epoch > self.reported_epoch:
                self.reported_epoch = self.epoch
                self.history.append(metrics)
                if self.on_epoch is not None:
                    self.on_epoch(self.epoch, metrics)
            if self.epoch % spec.checkpoint_every_epochs == 0 or self.epoch == spec.epochs:
                checkpoint = self.group.execute_on(0, "save")
                self._set_last_good(checkpoint)
                if self.epoch > self.checkpointed_epoch:
                    self.checkpointed_epoch = self.epoch
                    if self.on_checkpoint is not None:
                        self.on_checkpoint(self.epoch, checkpoint)

    def _take_steps(
        self, epoch: int, batch_indices: list[int], refs: list[Any], totals: BatchStats
    ) -> int:
        """Wait for one call's steps and count them; how many steps to ask per call next."""
        assert self.group is not None
        per_rank: list[list[StepResult]] = self.group.gather(
            refs, should_stop=self._cancel_requested
        )
        for index, batch_index in enumerate(batch_indices[: len(per_rank[0])]):
            # A cancel asked for at a step boundary counts no later step of the call.
            self._check_cancel()
            self._count_step(epoch, batch_index, [steps[index] for steps in per_rank], totals)
        return steps_per_call(per_rank[0][-1].seconds)

    def _count_step(
        self, epoch: int, batch_index: int, results: list[StepResult], totals: BatchStats
    ) -> None:
        if not results[0].finite:
            self._diverged(epoch, batch_index, "non-finite loss or gradient")
        slots = _slots_in_order(results)
        step = BatchStats(
            loss_sum=sum(s.loss_sum for s in slots),
            samples=sum(s.samples for s in slots),
            correct=sum(s.correct for s in slots),
            predicted=sum(s.predicted for s in slots),
        )
        totals.add(step)
        self.step = results[0].step
        if self.on_step is not None and self.step > self.reported_step:
            self.reported_step = self.step
            if self.step % self.spec.log_every_steps == 0:
                self.on_step(self.step, step.mean_loss)

    def _diverged(self, epoch: int, batch_index: int, reason: str) -> NoReturn:
        """Skip the batch from now on and roll back, or fail after too many divergences."""
        self.divergences += 1
        self.skipped.add((epoch, batch_index))
        self._emit(
            "diverged",
            f"{reason} at epoch {epoch + 1}, batch {batch_index}; rolling back and "
            "skipping the batch",
            batch=batch_index,
            count=self.divergences,
            reason=reason,
        )
        if self.divergences >= self.max_divergences:
            raise TrainingDivergedError(reason, epoch=epoch, step=self.step, count=self.divergences)
        raise _Rollback

    def _finish(self) -> Metrics:
        assert self.group is not None
        test: Metrics = {}
        stats = self.group.execute_on(0, "evaluate_test")
        if stats is not None:
            loss_sum, samples, correct, predicted = stats
            test["test_loss"] = loss_sum / max(samples, 1)
            if predicted:
                test["test_accuracy"] = correct / predicted
        return test

    # --- faults and cancellation ----------------------------------------------------------------

    def _on_worker_failure(self, exc: WorkerFailedError) -> None:
        self.failures += 1
        self._stop_group()
        self._emit(
            "worker_failed",
            f"{exc} (failure {self.failures} of at most {self.max_failures})",
            rank=exc.rank,
            count=self.failures,
        )
        if self.failures > self.max_failures:
            raise TooManyWorkerFailuresError(
                f"workers failed {self.failures} times (max_failures={self.max_failures}); "
                f"last: {exc}",
                rank=exc.rank,
            ) from exc

    def _restore(self) -> None:
        assert self.group is not None and self.last_good_ref is not None
        positions = self.group.execute("load", self.last_good_ref)
        self.epoch, self.step = positions[0]
        self._emit("restored", f"rolled back to the checkpoint of epoch {self.epoch}")

    def _set_last_good(self, checkpoint: bytes) -> None:
        self.last_good = checkpoint
        self.last_good_ref = ray.put(checkpoint)

    def _cancel_requested(self) -> bool:
        return self.should_cancel is not None and bool(self.should_cancel())

    def _check_cancel(self) -> None:
        if self._cancel_requested():
            raise StopRequested

    def _stop_group(self) -> None:
        if self.group is not None:
            self.group.shutdown()
            self.group = None

    def _emit(self, kind: str, message: str, **data: Any) -> None:
        event = JobEvent(kind=kind, epoch=self.epoch, step=self.step, message=message, data=data)
        logger.info("%s: %s", kind, message)
        if self.on_event is not None:
            self.on_event(event)


def _slots_in_order(results: list[StepResult]) -> list[Any]:
    """Every rank's slot statistics, in slot order (so sums do not depend on the ranks)."""
    return sorted((s for r in results for s in r.slots), key=lambda s: s.slot)


def _epoch_metrics(report: EpochReport, totals: BatchStats, elapsed: float) -> Metrics:
    metrics: Metrics = {
        "train_loss": totals.mean_loss,
        "lr": report.lr,
        "samples_per_s": totals.samples / elapsed if elapsed > 0 else 0.0,
        "epoch_time_s": elapsed,
        "allreduce_time_s": report.allreduce_time_s,
    }
    if totals.accuracy is not None:
        metrics["train_accuracy"] = totals.accuracy
    metrics.update(report.diagnostics)
    if report.val is not None:
        val_loss_sum, val_samples, val_correct, val_predicted = report.val
        metrics["val_loss"] = val_loss_sum / max(val_samples, 1)
        if val_predicted:
            metrics["val_accuracy"] = val_correct / val_predicted
    accuracy = metrics.get("val_accuracy", metrics.get("train_accuracy"))
    if accuracy is not None:
        metrics["error_rate"] = 1.0 - accuracy
    return metrics


def final_weights(checkpoint: bytes) -> dict[str, np.ndarray]:
    """The model's parameters and buffers in a checkpoint, by name."""
    return split_prefix(from_npz_bytes(checkpoint), "model")
