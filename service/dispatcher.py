"""The dispatcher: claims jobs from the queue, runs them, writes what they produce.

Workers never touch the database or the artifact store: the runner hands back
metrics, checkpoints and the final model through callbacks, and the dispatcher
writes each of them fenced by the attempt's number; the test split's metrics go
in with the final result, as series at the job's last step. A heartbeat thread
renews the lease and notices a cancel request or a lost lease, which the runner
sees through ``should_cancel`` at its next step boundary (or while its workers
wait for resources). A failed attempt keeps the type and message of the error
its workers raised; the full traceback goes to the log.
"""

from __future__ import annotations

import logging
import math
import os
import re
import socket
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypedDict

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from core import Dataset, JobSpec, SpecError, parse_job_spec, summarize
from service import queue
from service.context import ServiceContext
from service.datasets import load_version, resolve_version
from service.jobs import targets_and_vocabulary
from service.models import Checkpoint, JobStatus, Team

log = logging.getLogger(__name__)

IDLE_POLL_S = 1.0
#: Longest error an attempt's row keeps; a longer one loses its middle.
MAX_ERROR_CHARS = 2000
_ERROR_CUT = " [...] "
_TERMINAL_ESCAPE = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")


class LeaseLost(RuntimeError):
    """The attempt no longer owns its job; its results are dropped."""


class JobCancelled(RuntimeError):
    pass


@dataclass
class RunCallbacks:
    on_epoch: Callable[[int, int, dict[str, float]], None]
    on_step: Callable[[int, float], None]
    on_checkpoint: Callable[[int, int, bytes], None]
    on_event: Callable[[str, dict[str, Any]], None]
    should_cancel: Callable[[], bool]


@dataclass
class RunOutcome:
    model: bytes
    final_metrics: dict[str, float] = field(default_factory=dict)
    #: Of the dataset's test split (``test_loss``, ``test_accuracy``); also in
    #: ``final_metrics``, and written as series at the job's last step.
    test_metrics: dict[str, float] = field(default_factory=dict)
    cancelled: bool = False


class JobRunner(Protocol):
    def __call__(
        self, *, job: JobSpec, dataset: Dataset, resume: bytes | None, callbacks: RunCallbacks
    ) -> RunOutcome: ...


@dataclass
class _FitCallbacks:
    """The runner's callbacks in the ``(epoch, ...)`` form that ``core.fit`` and
    ``workers.run_job`` call, with the step each epoch ends on filled in."""

    callbacks: RunCallbacks
    log_every_steps: int
    steps_per_epoch: int
    history: list[dict[str, float]] = field(default_factory=list)

    @classmethod
    def for_job(cls, job: JobSpec, dataset: Dataset, callbacks: RunCallbacks) -> _FitCallbacks:
        return cls(
            callbacks=callbacks,
            log_every_steps=job.training.log_every_steps,
            steps_per_epoch=steps_per_epoch(job, dataset),
        )

    def on_step(self, step: int, loss: float) -> None:
        if self.callbacks.should_cancel():
            raise JobCancelled
        if step % self.log_every_steps == 0:
            self.callbacks.on_step(step, loss)

    def on_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        self.history.append(metrics)
        self.callbacks.on_epoch(epoch, epoch * self.steps_per_epoch, metrics)

    def on_checkpoint(self, epoch: int, state: bytes) -> None:
        self.callbacks.on_checkpoint(epoch, epoch * self.steps_per_epoch, state)

    def final_metrics(self, test: dict[str, float]) -> dict[str, float]:
        final = dict(self.history[-1]) if self.history else {}
        final.update(test)
        return final


def steps_per_epoch(job: JobSpec, dataset: Dataset) -> int:
    """Optimizer steps in one epoch of ``job``: epoch ``e`` ends at step ``e * this``,
    whichever attempt runs it."""
    from core.data import split_indices

    training = job.training
    n_train = len(split_indices(len(dataset.X), training.validation_split, training.seed)[0])
    return math.ceil(n_train / training.batch_size)


def local_runner(
    *, job: JobSpec, dataset: Dataset, resume: bytes | None, callbacks: RunCallbacks
) -> RunOutcome:
    """Runs a job in this process with ``core.fit``, without Ray."""
    from core import fit

    adapter = _FitCallbacks.for_job(job, dataset, callbacks)
    try:
        result = fit(
            job,
            dataset,
            resume=resume,
            on_step=adapter.on_step,
            on_epoch=adapter.on_epoch,
            on_checkpoint=adapter.on_checkpoint,
        )
    except JobCancelled:
        return RunOutcome(model=b"", cancelled=True)
    return RunOutcome(
        model=result.trainer.save(),
        final_metrics=adapter.final_metrics(result.test),
        test_metrics=result.test,
    )


def ray_runner(
    *, job: JobSpec, dataset: Dataset, resume: bytes | None, callbacks: RunCallbacks
) -> RunOutcome:
    """Runs a job on a group of ``resources.workers`` Ray actors (data parallel)."""
    from workers.errors import JobCancelledError
    from workers.trainer import run_job

    adapter = _FitCallbacks.for_job(job, dataset, callbacks)
    try:
        result = run_job(
            job,
            dataset,
            resume=resume,
            on_step=adapter.on_step,
            on_epoch=adapter.on_epoch,
            on_checkpoint=adapter.on_checkpoint,
            on_event=lambda event: callbacks.on_event(
                event.kind, {"epoch": event.epoch, "step": event.step, "message": event.message}
            ),
            should_cancel=callbacks.should_cancel,
        )
    except (JobCancelled, JobCancelledError):
        return RunOutcome(model=b"", cancelled=True)
    return RunOutcome(
        model=result.checkpoint,
        final_metrics=adapter.final_metrics(result.test),
        test_metrics=result.test,
    )


def attempt_error(exc: BaseException, *, note: str = "") -> str:
    """What a failed attempt's row says of ``exc``: the type and message of the error
    its workers raised (Ray's wrappers and their tracebacks taken off), without
    terminal colours, then ``note``; at most ``MAX_ERROR_CHARS`` long: a longer one
    keeps its start and its end, where a message's last line usually says what went
    wrong."""
    from workers.errors import root_cause

    cause = root_cause(exc)
    message = _TERMINAL_ESCAPE.sub("", str(cause)).strip()
    error = f"{type(cause).__name__}: {message}" if message else type(cause).__name__
    return _cut(error + note)


def _cut(text: str) -> str:
    """``text`` without terminal colours, at most ``MAX_ERROR_CHARS`` long: a longer one
    keeps its start and its end."""
    text = _TERMINAL_ESCAPE.sub("", text)
    if len(text) > MAX_ERROR_CHARS:
        head = MAX_ERROR_CHARS // 4
        tail = MAX_ERROR_CHARS - head - len(_ERROR_CUT)
        text = text[:head] + _ERROR_CUT + text[-tail:]
    return text


def will_repeat(exc: BaseException) -> bool:
    """Whether ``exc`` says the job itself cannot run (a spec that does not fit its
    data, found where submission could not look): another attempt would fail alike."""
    from workers.errors import root_cause

    return isinstance(root_cause(exc), SpecError)


class Dispatcher:
    def __init__(
        self,
        context: ServiceContext,
        *,
        runner: JobRunner = local_runner,
        owner: str | None = None,
    ) -> None:
        self.context = context
        self.runner = runner
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.retry = queue.RetryStrategy(
            base_s=context.settings.retry_backoff_s, max_s=context.settings.retry_backoff_max_s
        )

    def run_forever(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                worked = self.run_once()
            except SQLAlchemyError:
                log.exception("database error in the dispatcher loop; retrying")
                worked = False
            except Exception:  # a dispatcher that stopped would leave the queue unserved
                log.exception("unexpected error in the dispatcher loop; going on")
                worked = False
            if not worked:
                stop.wait(IDLE_POLL_S)

    def run_once(self) -> bool:
        """Claim and run one job; False when the queue had nothing to claim."""
        settings = self.context.settings
        claimed = queue.claim_next_job(
            session_factory=self.context.session_factory, owner=self.owner, lease_s=settings.lease_s
        )
        if claimed is None:
            return False
        _Attempt(self, claimed).run()
        return True


class _Fence(TypedDict):
    """What identifies an attempt's writes to the queue."""

    session_factory: sessionmaker[Session]
    job_id: int
    attempt: int


class _Attempt:
    """One attempt at one job, from claim to a final write."""

    def __init__(self, dispatcher: Dispatcher, claimed: queue.ClaimedJob) -> None:
        self.dispatcher = dispatcher
        self.context = dispatcher.context
        self.claimed = claimed
        self.fence = _Fence(
            session_factory=self.context.session_factory,
            job_id=claimed.id,
            attempt=claimed.attempt,
        )
        self.cancel_requested = threading.Event()
        self.lost = threading.Event()
        self.done = threading.Event()

    def run(self) -> None:
        heartbeat = threading.Thread(target=self._heartbeat, daemon=True, name="trainq-heartbeat")
        heartbeat.start()
        try:
            self._run()
        except LeaseLost:
            log.warning("job %s attempt %s lost its lease", self.claimed.id, self.claimed.attempt)
        except Exception as exc:  # the attempt fails; the queue decides about a retry
            # The log keeps the whole story (a worker's error carries its traceback).
            log.exception("job %s attempt %s failed", self.claimed.id, self.claimed.attempt)
            error = attempt_error(exc)
            if will_repeat(exc):
                queue.fail_attempt(**self.fence, error=f"{error} (not retried)", retry=None)
            else:
                queue.fail_attempt(**self.fence, error=error, retry=self.dispatcher.retry)
        finally:
            self.done.set()
            heartbeat.join(timeout=5)

    def _heartbeat(self) -> None:
        settings = self.context.settings
        while not self.done.wait(settings.heartbeat_s):
            try:
                lease = queue.renew_lease(**self.fence, lease_s=settings.lease_s)
            except SQLAlchemyError:
                log.exception("heartbeat failed; trying again")
                continue
            if not lease.held:
                self.lost.set()
                return
            if lease.cancel_requested:
                self.cancel_requested.set()

    def _should_stop(self) -> bool:
        if self.lost.is_set():
            raise LeaseLost
        return self.cancel_requested.is_set()

    def _run(self) -> None:
        claimed = self.claimed
        job = parse_job_spec(claimed.spec)
        with self.context.session_factory() as session:
            team = session.get(Team, claimed.team_id)
            assert team is not None
            version = resolve_version(
                session=session,
                team=team,
                name=claimed.dataset_name,
                version=claimed.dataset_version,
            )
            if version is None:
                raise LookupError(
                    f"dataset {claimed.dataset_name} v{claimed.dataset_version} is gone"
                )
            resume = self._latest_checkpoint(session)
        dataset = load_version(store=self.context.store, version=version)
        # The checks a submission makes, again with the data at hand (one that could not
        # be read then, a job queued before a check existed): a failure is not retried.
        label_shape, vocab_size = targets_and_vocabulary(version, None, loaded=dataset)
        summarize(
            job.model,
            dataset.input_shape,
            dataset.num_classes,
            label_shape=label_shape,
            vocab_size=vocab_size,
        )
        lease = queue.renew_lease(**self.fence, lease_s=self.context.settings.lease_s)
        if not lease.held:
            raise LeaseLost
        if lease.cancel_requested:
            self.cancel_requested.set()
        outcome = self.dispatcher.runner(
            job=job,
            dataset=dataset,
            resume=resume,
            callbacks=RunCallbacks(
                on_epoch=self._on_epoch,
                on_step=self._on_step,
                on_checkpoint=self._on_checkpoint,
                on_event=self._on_event,
                should_cancel=self._should_stop,
            ),
        )
        if outcome.cancelled:
            queue.finish_attempt(**self.fence, status=JobStatus.cancelled, error="cancelled")
            return
        sha256 = self.context.store.put(outcome.model)
        last_step = job.training.epochs * steps_per_epoch(job, dataset)
        if not queue.finish_attempt(
            **self.fence,
            status=JobStatus.succeeded,
            final_metrics=outcome.final_metrics,
            model_sha256=sha256,
            metrics=[(name, last_step, value) for name, value in outcome.test_metrics.items()],
        ):
            raise LeaseLost

    def _latest_checkpoint(self, session: Any) -> bytes | None:
        from sqlalchemy import select

        row = session.scalars(
            select(Checkpoint)
            .where(Checkpoint.job_id == self.claimed.id)
            .order_by(Checkpoint.epoch.desc())
            .limit(1)
        ).first()
        return self.context.store.get(row.sha256) if row is not None else None

    def _write(self, rows: list[tuple[str, int, float]]) -> None:
        if not queue.write_metrics(**self.fence, rows=rows):
            raise LeaseLost

    def _on_epoch(self, epoch: int, step: int, metrics: dict[str, float]) -> None:
        rows = [(name, step, value) for name, value in metrics.items()]
        rows.append(("epoch", step, float(epoch)))
        self._write(rows)

    def _on_step(self, step: int, loss: float) -> None:
        self._write([("loss", step, loss)])

    def _on_event(self, kind: str, detail: dict[str, Any]) -> None:
        log.info("job %s: %s %s", self.claimed.id, kind, detail)
        if not queue.record_event(
            **self.fence,
            kind=kind,
            epoch=int(detail["epoch"]),
            step=int(detail["step"]),
            message=_cut(str(detail["message"])),
        ):
            raise LeaseLost

    def _on_checkpoint(self, epoch: int, step: int, state: bytes) -> None:
        sha256 = self.context.store.put(state)
        if not queue.record_checkpoint(
            **self.fence, epoch=epoch, step=step, sha256=sha256, size_bytes=len(state)
        ):
            raise LeaseLost
