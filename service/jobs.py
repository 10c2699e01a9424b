"""Submitting, listing, reading and cancelling jobs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core import SpecError, parse_job_spec, summarize
from service import queue
from service.datasets import resolve_version
from service.db import begin_write
from service.errors import Conflict, Invalid, NotFound
from service.models import Attempt, Job, JobStatus, Team


@dataclass(frozen=True)
class Limits:
    max_total_params: int
    #: Workers the cluster can ever give a job; None when unknown.
    cluster_workers: int | None


def _invalid_spec(exc: SpecError) -> Invalid:
    return Invalid(("body", *exc.loc), str(exc))


def create_job(
    *,
    session: Session,
    team: Team,
    body: dict[str, Any],
    limits: Limits,
    idempotency_key: str | None = None,
) -> tuple[Job, bool]:
    """Validate and enqueue a job; returns ``(job, created)``.

    With an ``idempotency_key`` a retried request returns the job the first one
    created. Nothing is stored unless the whole spec is valid.
    """
    try:
        spec = parse_job_spec(body)
    except SpecError as exc:
        raise _invalid_spec(exc) from None
    dataset = resolve_version(
        session=session, team=team, name=spec.dataset.name, version=spec.dataset.version
    )
    if dataset is None:
        what = f"version {spec.dataset.version} of " if spec.dataset.version else ""
        raise Invalid(("body", "dataset", "name"), f"no {what}dataset named {spec.dataset.name!r}")
    try:
        summary = summarize(spec.model, tuple(dataset.input_shape), dataset.num_classes)
    except SpecError as exc:
        raise _invalid_spec(exc) from None
    if summary.params > limits.max_total_params:
        raise Invalid(
            ("body", "model", "layers"),
            f"the model has {summary.params:,} parameters; the limit is "
            f"{limits.max_total_params:,}",
        )
    if limits.cluster_workers is not None and spec.resources.workers > limits.cluster_workers:
        raise Invalid(
            ("body", "resources", "workers"),
            f"the job needs {spec.resources.workers} workers but the cluster can give at most "
            f"{limits.cluster_workers}",
        )
    begin_write(session)
    if idempotency_key is not None:
        existing = _by_idempotency_key(session, team, idempotency_key)
        if existing is not None:
            return _same_request(existing, body), False
    job = Job(
        team_id=team.id,
        name=spec.name,
        status=JobStatus.queued,
        spec=spec.model_dump(mode="json"),
        dataset_name=dataset.name,
        dataset_version=dataset.version,
        priority=spec.priority,
        max_retries=spec.max_retries,
        idempotency_key=idempotency_key,
    )
    session.add(job)
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        existing = _by_idempotency_key(session, team, idempotency_key) if idempotency_key else None
        if existing is None:
            raise
        return _same_request(existing, body), False
    return job, True


def _by_idempotency_key(session: Session, team: Team, key: str) -> Job | None:
    return session.scalars(
        select(Job).where(Job.team_id == team.id, Job.idempotency_key == key)
    ).first()


def _same_request(job: Job, body: dict[str, Any]) -> Job:
    try:
        spec = parse_job_spec(body).model_dump(mode="json")
    except SpecError:
        spec = None
    if spec is not None and spec != job.spec:
        raise Conflict("this Idempotency-Key was used for a different job spec")
    return job


def get_job(*, session: Session, team: Team, job_id: int) -> Job:
    """The team's job; another team's id is not found, like a missing one."""
    job = session.get(Job, job_id)
    if job is None or job.team_id != team.id:
        raise NotFound(f"job {job_id} not found")
    return job


def list_jobs(
    *,
    session: Session,
    team: Team,
    status: JobStatus | None = None,
    name: str | None = None,
    cursor: int | None = None,
    limit: int = 50,
) -> tuple[list[Job], int, int | None]:
    """Newest first; returns ``(page, total matching, next cursor)``."""
    conditions = [Job.team_id == team.id]
    if status is not None:
        conditions.append(Job.status == status)
    if name is not None:
        conditions.append(Job.name == name)
    total = session.scalar(select(func.count()).select_from(Job).where(*conditions)) or 0
    query = select(Job).where(*conditions)
    if cursor is not None:
        query = query.where(Job.id < cursor)
    page = list(session.scalars(query.order_by(Job.id.desc()).limit(limit + 1)))
    next_cursor = page[limit - 1].id if len(page) > limit else None
    return page[:limit], total, next_cursor


def attempts_of(*, session: Session, job: Job) -> list[Attempt]:
    return list(
        session.scalars(select(Attempt).where(Attempt.job_id == job.id).order_by(Attempt.number))
    )


def jobs_ahead(*, session: Session, job: Job) -> int:
    """Queued jobs that the claim order puts before this one."""
    if job.status != JobStatus.queued:
        return 0
    ahead = or_(
        Job.priority > job.priority,
        and_(Job.priority == job.priority, Job.id < job.id),
    )
    return (
        session.scalar(
            select(func.count()).select_from(Job).where(Job.status == JobStatus.queued, ahead)
        )
        or 0
    )


def cancel(*, session: Session, team: Team, job_id: int) -> Job:
    begin_write(session)
    job = get_job(session=session, team=team, job_id=job_id)
    queue.cancel_job(session=session, job=job)
    return job
