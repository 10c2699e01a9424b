"""The job queue, kept in the database.

A dispatcher claims the next job by priority then age (``FOR UPDATE SKIP LOCKED``
on PostgreSQL; the write lock taken at ``BEGIN IMMEDIATE`` on SQLite), holds a
lease that it renews by heartbeat, and writes everything of an attempt fenced by
the attempt's number: once a lease has expired and the job was claimed again,
the stale attempt's writes change nothing.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    BigInteger,
    DateTime,
    Float,
    Integer,
    String,
    and_,
    bindparam,
    case,
    func,
    literal,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

from service.db import utcnow, write_lock_session
from service.errors import Conflict
from service.models import (
    Attempt,
    AttemptStatus,
    Checkpoint,
    Job,
    JobStatus,
    Metric,
    RunEvent,
)


@dataclass(frozen=True)
class RetryStrategy:
    """Exponential backoff between attempts: ``base_s * 2**(attempt - 1)``, capped."""

    base_s: float = 2.0
    max_s: float = 300.0

    def delay_s(self, attempt: int) -> float:
        return min(self.base_s * 2 ** max(attempt - 1, 0), self.max_s)


@dataclass(frozen=True)
class ClaimedJob:
    id: int
    attempt: int
    team_id: int
    spec: dict[str, Any]
    dataset_name: str
    dataset_version: int


@dataclass(frozen=True)
class Lease:
    """What a heartbeat learns: whether the attempt still owns the job, and if a cancel is asked."""

    held: bool
    cancel_requested: bool


def claim_next_job(
    *,
    session_factory: sessionmaker[Session],
    owner: str,
    lease_s: float,
    now: datetime | None = None,
) -> ClaimedJob | None:
    """Claim the most urgent claimable job: one whose lease expired, else the queued
    job (past its backoff) first by priority then age. Starts a new attempt; None
    when nothing is claimable."""
    with write_lock_session(session_factory) as session:
        while True:
            now = now or utcnow()
            # A job whose lease expired was started before anything queued now: it goes
            # first. Each query walks its own index (a single OR would scan the table).
            job = (
                session.scalars(
                    select(Job)
                    .where(Job.status == JobStatus.running, Job.lease_expires_at < now)
                    .order_by(Job.lease_expires_at)
                    .limit(1)
                    .with_for_update(skip_locked=True)
                ).first()
                or session.scalars(
                    select(Job)
                    .where(Job.status == JobStatus.queued, Job.available_at <= now)
                    .order_by(Job.priority.desc(), Job.id)
                    .limit(1)
                    .with_for_update(skip_locked=True)
                ).first()
            )
            if job is None:
                session.commit()
                return None
            if job.status == JobStatus.running:
                _mark_attempt(session, job.id, job.attempts, AttemptStatus.lost, "lease expired")
                if job.cancel_requested or job.attempts > job.max_retries:
                    if job.cancel_requested:  # asked of the lost attempt: not run again
                        job.status, job.error = JobStatus.cancelled, "cancelled"
                    else:
                        job.status = JobStatus.failed
                        job.error = f"lease expired on attempt {job.attempts}; no retries left"
                    job.finished_at = now
                    job.lease_owner = None
                    job.lease_expires_at = None
                    session.flush()
                    continue
            job.status = JobStatus.running
            job.attempts += 1
            job.lease_owner = owner
            job.lease_expires_at = now + timedelta(seconds=lease_s)
            job.started_at = job.started_at or now
            session.add(
                Attempt(job_id=job.id, number=job.attempts, dispatcher=owner, started_at=now)
            )
            claimed = ClaimedJob(
                id=job.id,
                attempt=job.attempts,
                team_id=job.team_id,
                spec=job.spec,
                dataset_name=job.dataset_name,
                dataset_version=job.dataset_version,
            )
            session.commit()
            return claimed


def _fenced(job_id: int, attempt: int) -> Any:
    """The condition every write of an attempt carries."""
    return and_(Job.id == job_id, Job.attempts == attempt, Job.status == JobStatus.running)


def _still_owns(session: Session, job_id: int, attempt: int) -> bool:
    """Whether the attempt still owns its job; FOR SHARE (PostgreSQL) or the write
    lock (SQLite) holds off a re-claim until the caller's transaction ends."""
    owner = session.execute(
        select(Job.id).where(_fenced(job_id, attempt)).with_for_update(read=True)
    ).first()
    if owner is None:
        session.commit()
        return False
    return True


def _mark_attempt(
    session: Session, job_id: int, number: int, status: AttemptStatus, error: str | None = None
) -> None:
    session.execute(
        update(Attempt)
        .where(Attempt.job_id == job_id, Attempt.number == number)
        .values(status=status, error=error, finished_at=utcnow())
    )


def renew_lease(
    *, session_factory: sessionmaker[Session], job_id: int, attempt: int, lease_s: float
) -> Lease:
    """Extend the lease of a running attempt; ``held`` is False once it lost the job."""
    with session_factory() as session:
        expires = utcnow() + timedelta(seconds=lease_s)
        result = session.execute(
            update(Job)
            .where(_fenced(job_id, attempt))
            .values(lease_expires_at=expires)
            .returning(Job.cancel_requested)
        ).first()
        session.commit()
    if result is None:
        return Lease(held=False, cancel_requested=False)
    return Lease(held=True, cancel_requested=bool(result[0]))


def finish_attempt(
    *,
    session_factory: sessionmaker[Session],
    job_id: int,
    attempt: int,
    status: JobStatus,
    error: str | None = None,
    final_metrics: dict[str, float] | None = None,
    model_sha256: str | None = None,
    metrics: Iterable[tuple[str, int, float]] = (),
) -> bool:
    """End a job from its running attempt (succeeded, cancelled or failed for good),
    with ``(name, step, value)`` metric rows written in the same transaction (a
    stale attempt writes none of it; rows that exist stay, as in :func:`write_metrics`).
    False when the attempt no longer owns the job."""
    attempt_status = {
        JobStatus.succeeded: AttemptStatus.succeeded,
        JobStatus.cancelled: AttemptStatus.cancelled,
        JobStatus.failed: AttemptStatus.failed,
    }[status]
    batch = list(metrics)
    with write_lock_session(session_factory) as session:
        now = utcnow()
        values: dict[str, Any] = {
            "status": status,
            "error": error,
            "finished_at": now,
            "lease_owner": None,
            "lease_expires_at": None,
        }
        if final_metrics is not None:
            values["final_metrics"] = final_metrics
        if model_sha256 is not None:
            values["model_sha256"] = model_sha256
        done = session.connection().execute(
            update(Job).where(_fenced(job_id, attempt)).values(**values)
        )
        if done.rowcount:  # the job's row is this attempt's, and locked until the commit
            _mark_attempt(session, job_id, attempt, attempt_status, error)
            _insert_metrics(session, job_id, attempt, batch)
        session.commit()
        return bool(done.rowcount)


def fail_attempt(
    *,
    session_factory: sessionmaker[Session],
    job_id: int,
    attempt: int,
    error: str,
    retry: RetryStrategy | None,
) -> JobStatus | None:
    """Record a failed attempt: the job is queued again after a backoff while retries
    remain, else it fails (at once with ``retry`` None: an error that would repeat).
    Returns the new status, or None if the attempt was stale."""
    with write_lock_session(session_factory) as session:
        job = session.scalars(select(Job).where(_fenced(job_id, attempt)).with_for_update()).first()
        if job is None:
            session.commit()
            return None
        now = utcnow()
        _mark_attempt(session, job_id, attempt, AttemptStatus.failed, error)
        if job.cancel_requested:
            job.status = JobStatus.cancelled
            job.finished_at = now
        elif retry is not None and attempt <= job.max_retries:
            job.status = JobStatus.queued
            job.available_at = now + timedelta(seconds=retry.delay_s(attempt))
        else:
            job.status = JobStatus.failed
            job.finished_at = now
        job.error = error
        job.lease_owner = None
        job.lease_expires_at = None
        status = job.status
        session.commit()
        return status


def cancel_job(*, session: Session, job: Job) -> None:
    """A queued job is cancelled at once; a running one is asked to stop (its
    dispatcher sees the request at its next heartbeat). A job that has ended is a
    :class:`Conflict` and stays as it was.

    One statement decides on the status the row has when it is written, so a job
    claimed or finished since ``job`` was read is cancelled or refused as it is now.
    """
    queued = Job.status == JobStatus.queued
    asked = session.execute(
        update(Job)
        .where(Job.id == job.id, Job.status.in_((JobStatus.queued, JobStatus.running)))
        .values(
            status=case((queued, literal(JobStatus.cancelled, Job.status.type)), else_=Job.status),
            finished_at=case((queued, utcnow()), else_=Job.finished_at),
            cancel_requested=True,
        )
        .returning(Job.id)
    ).first()
    session.commit()
    session.refresh(job)
    if asked is None:
        ended = "been cancelled" if job.status == JobStatus.cancelled else job.status.value
        raise Conflict(f"job {job.id} has already {ended}")


def record_checkpoint(
    *,
    session_factory: sessionmaker[Session],
    job_id: int,
    attempt: int,
    epoch: int,
    step: int,
    sha256: str,
    size_bytes: int,
) -> bool:
    """Record a stored checkpoint of a running attempt (once per epoch); False when
    the attempt no longer owns the job."""
    with write_lock_session(session_factory) as session:
        if not _still_owns(session, job_id, attempt):
            return False
        insert = _insert_for(session)
        session.execute(
            insert(Checkpoint)
            .values(
                job_id=job_id,
                attempt=attempt,
                epoch=epoch,
                step=step,
                sha256=sha256,
                size_bytes=size_bytes,
            )
            .on_conflict_do_nothing(index_elements=["job_id", "epoch"])
        )
        session.commit()
        return True


def record_event(
    *,
    session_factory: sessionmaker[Session],
    job_id: int,
    attempt: int,
    kind: str,
    epoch: int,
    step: int,
    message: str,
) -> bool:
    """Record what a running attempt's workers told; False when the attempt no longer
    owns the job."""
    with write_lock_session(session_factory) as session:
        if not _still_owns(session, job_id, attempt):
            return False
        session.add(
            RunEvent(
                job_id=job_id, attempt=attempt, kind=kind, epoch=epoch, step=step, message=message
            )
        )
        session.commit()
        return True


def _insert_for(session: Session) -> Any:
    """The dialect's INSERT, which knows ON CONFLICT DO NOTHING."""
    return postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert


def _insert_metrics(
    session: Session, job_id: int, attempt: int, batch: list[tuple[str, int, float]]
) -> None:
    """The rows of :func:`write_metrics`, in the caller's transaction."""
    if batch and session.get_bind().dialect.name == "postgresql":
        # One statement over three arrays: PostgreSQL inserts the batch as a set
        # rather than row by row.
        names, steps, values = zip(*batch, strict=True)
        session.connection().execute(
            _metrics_from_arrays(),
            {
                "job_id": job_id,
                "attempt": attempt,
                "created_at": utcnow(),
                "names": list(names),
                "steps": [int(step) for step in steps],
                "values": [float(value) for value in values],
            },
        )
    elif batch:
        statement = sqlite.insert(Metric).on_conflict_do_nothing(
            index_elements=["job_id", "name", "step"]
        )
        # executemany: sqlite3 loops over the rows in C
        session.connection().execute(
            statement,
            [
                {
                    "job_id": job_id,
                    "name": name,
                    "step": int(step),
                    "value": float(value),
                    "attempt": attempt,
                }
                for name, step, value in batch
            ],
        )


@functools.cache
def _metrics_from_arrays() -> Any:
    """``INSERT INTO metrics ... SELECT ... FROM unnest(:names, :steps, :values)``,
    keeping a row that exists already."""
    metrics = Metric.metadata.tables[Metric.__tablename__]
    arrays = (
        func.unnest(
            bindparam("names", type_=postgresql.ARRAY(String)),
            bindparam("steps", type_=postgresql.ARRAY(BigInteger)),
            bindparam("values", type_=postgresql.ARRAY(Float)),
        )
        .table_valued("name", "step", "value")
        .render_derived()
    )
    rows = select(
        bindparam("job_id", type_=Integer),
        arrays.c.name,
        arrays.c.step,
        arrays.c.value,
        bindparam("attempt", type_=Integer),
        bindparam("created_at", type_=DateTime()),
    ).select_from(arrays)
    return (
        postgresql.insert(metrics)
        .from_select(["job_id", "name", "step", "value", "attempt", "created_at"], rows)
        .on_conflict_do_nothing(index_elements=["job_id", "name", "step"])
    )


def write_metrics(
    *,
    session_factory: sessionmaker[Session],
    job_id: int,
    attempt: int,
    rows: Iterable[tuple[str, int, float]],
) -> bool:
    """Insert ``(name, step, value)`` rows for a running attempt; a row that exists
    already (an epoch redone after a resume) is kept as it was. False when the
    attempt no longer owns the job (nothing is written then)."""
    batch = list(rows)
    with write_lock_session(session_factory) as session:
        if not _still_owns(session, job_id, attempt):
            return False
        _insert_metrics(session, job_id, attempt, batch)
        session.commit()
        return True
