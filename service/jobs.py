"""Submitting, listing, reading and cancelling jobs."""

from __future__ import annotations

import functools
import io
import json
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import and_, bindparam, func, or_, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from core import Dataset, JobSpec, SpecError, parse_job_spec, summarize
from core.data import DatasetUnavailable
from core.text import TEXT_CLASSIFICATION, TEXT_LM
from service import queue
from service.artifacts import ArtifactStore
from service.datasets import load_version, resolve_version, resolved_id, targets_of
from service.db import begin_single_write, begin_write, utcnow
from service.errors import Conflict, Invalid, NotFound
from service.models import Attempt, DatasetVersion, Job, JobStatus, RunEvent, Team

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    max_total_params: int
    #: Workers the cluster can ever give a job; None when unknown.
    cluster_workers: int | None
    #: GPUs in the cluster (a GPU worker takes one); None when unknown.
    cluster_gpus: int | None = None


@dataclass(frozen=True)
class ChosenDataset:
    """What a submission needs of the dataset version its spec resolved to."""

    id: int
    name: str
    version: int
    input_shape: tuple[int, ...]
    num_classes: int | None
    #: One sample's targets: () one label or number, (time,) one label per token; None
    #: when unknown.
    label_shape: tuple[int, ...] | None
    #: How many token ids a text dataset's inputs use; None for other datasets, or unknown.
    vocab_size: int | None


#: Entries each map of a :class:`SubmissionCache` holds before it starts over.
SUBMISSION_CACHE_ENTRIES = 4096
#: Times a submission resolves its dataset again when an upload moved it meanwhile.
SUBMIT_TRIES = 3


class SubmissionCache:
    """What validating submissions looks up again and again, kept per process.

    Dataset versions are immutable rows, but which one a name resolves to changes
    when a team uploads: the INSERT resolves the name again in the same statement
    and stores nothing when the cached choice no longer holds, and the submission
    then resolves it afresh. Parameter counts depend only on the model spec and
    the dataset's shapes.

    With a ``store``, uploads are read where their row does not say what a submission
    checks (see :func:`targets_and_vocabulary`); without, those checks are skipped.
    """

    def __init__(self, store: ArtifactStore | None = None) -> None:
        self.store = store
        self._datasets: dict[tuple[int, str, int | None], ChosenDataset] = {}
        self._params: dict[tuple[Any, ...], int] = {}

    def dataset(self, team_id: int, name: str, version: int | None) -> ChosenDataset | None:
        return self._datasets.get((team_id, name, version))

    def keep_dataset(
        self, team_id: int, name: str, version: int | None, chosen: ChosenDataset
    ) -> None:
        if len(self._datasets) >= SUBMISSION_CACHE_ENTRIES:
            self._datasets.clear()
        self._datasets[(team_id, name, version)] = chosen

    def forget_dataset(self, team_id: int, name: str, version: int | None) -> None:
        self._datasets.pop((team_id, name, version), None)

    def params(self, spec: JobSpec, stored: dict[str, Any], dataset: ChosenDataset) -> int:
        """Total parameters of the job's model (``stored`` is its spec as stored) on
        ``dataset``; raises :class:`SpecError` when the layers do not fit its shapes."""
        key = (
            json.dumps(stored["model"]),
            dataset.input_shape,
            dataset.num_classes,
            dataset.label_shape,
            dataset.vocab_size,
        )
        params = self._params.get(key)
        if params is None:
            params = summarize(
                spec.model,
                dataset.input_shape,
                dataset.num_classes,
                label_shape=dataset.label_shape,
                vocab_size=dataset.vocab_size,
            ).params
            if len(self._params) >= SUBMISSION_CACHE_ENTRIES:
                self._params.clear()
            self._params[key] = params
        return params


def create_job(
    *,
    session: Session,
    team: Team,
    body: dict[str, Any],
    limits: Limits,
    idempotency_key: str | None = None,
    cache: SubmissionCache | None = None,
) -> tuple[Job, bool]:
    """Validate and enqueue a job; returns ``(job, created)``.

    With an ``idempotency_key`` a retried request returns the job the first one
    created. Nothing is stored unless the whole spec is valid. The job is stored
    by one statement, which also checks the dataset resolution (and, with a key,
    that the key is new).
    """
    try:
        spec = parse_job_spec(body)
    except SpecError as exc:
        raise Invalid.in_body(exc) from None
    stored = spec.model_dump(mode="json")
    cache = cache if cache is not None else SubmissionCache()
    wanted = (team.id, spec.dataset.name, spec.dataset.version)
    for _ in range(SUBMIT_TRIES):
        dataset = cache.dataset(*wanted)
        if dataset is None:
            dataset = _choose_dataset(session, team, spec, cache.store)
            cache.keep_dataset(*wanted, dataset)
        _check_limits(spec, stored, dataset, limits, cache)
        job = _insert_job(session, team, spec, stored, dataset, idempotency_key)
        if job is not None:
            return job, True
        if idempotency_key is not None:
            existing = _by_idempotency_key(session, team, idempotency_key)
            if existing is not None:
                return _same_request(existing, stored), False
        cache.forget_dataset(*wanted)  # an upload changed what the name resolves to
    raise Conflict(f"dataset {spec.dataset.name!r} kept changing; submit the job again")


def _choose_dataset(
    session: Session, team: Team, spec: JobSpec, store: ArtifactStore | None
) -> ChosenDataset:
    version = resolve_version(
        session=session, team=team, name=spec.dataset.name, version=spec.dataset.version
    )
    if version is None:
        what = f"version {spec.dataset.version} of " if spec.dataset.version else ""
        raise Invalid(("body", "dataset", "name"), f"no {what}dataset named {spec.dataset.name!r}")
    label_shape, vocab_size = targets_and_vocabulary(version, store)
    return ChosenDataset(
        id=version.id,
        name=version.name,
        version=version.version,
        input_shape=tuple(version.input_shape),
        num_classes=version.num_classes,
        label_shape=label_shape,
        vocab_size=vocab_size,
    )


def targets_and_vocabulary(
    version: DatasetVersion, store: ArtifactStore | None, loaded: Dataset | None = None
) -> tuple[tuple[int, ...] | None, int | None]:
    """The shape of one sample's targets and a text dataset's vocabulary size, each
    None when unknown.

    The row says them (see :func:`service.datasets.targets_of`). An upload stored
    before it did is read: ``loaded``, its data when the caller has it, or from the
    store (a regression's ``y`` alone); with neither, what its row implies.
    """
    if version.label_shape is not None:
        return tuple(version.label_shape), version.vocab_size
    if version.kind == TEXT_LM:
        return tuple(version.input_shape), version.num_classes
    label_shape = () if version.num_classes is not None else None
    if version.kind != TEXT_CLASSIFICATION and label_shape is not None:
        return label_shape, None
    if loaded is not None:
        return targets_of(loaded)
    if store is None:
        return label_shape, None
    try:
        if version.kind == TEXT_CLASSIFICATION:
            return targets_of(load_version(store=store, version=version))
        assert version.sha256 is not None  # built-ins all have classes
        with np.load(io.BytesIO(store.get(version.sha256)), allow_pickle=False) as arrays:
            return tuple(int(d) for d in arrays["y"].shape[1:]), None
    except (DatasetUnavailable, KeyError, OSError, ValueError) as exc:
        # the run will say what is wrong with the data; the spec is checked as far as known
        log.warning(
            "dataset %s v%s unreadable at submission: %s", version.name, version.version, exc
        )
        return label_shape, None


def _check_limits(
    spec: JobSpec,
    stored: dict[str, Any],
    dataset: ChosenDataset,
    limits: Limits,
    cache: SubmissionCache,
) -> None:
    try:
        params = cache.params(spec, stored, dataset)
    except SpecError as exc:
        raise Invalid.in_body(exc) from None
    if params > limits.max_total_params:
        raise Invalid(
            ("body", "model", "layers"),
            f"the model has {params:,} parameters; the limit is {limits.max_total_params:,}",
        )
    if limits.cluster_workers is not None and spec.resources.workers > limits.cluster_workers:
        raise Invalid(
            ("body", "resources", "workers"),
            f"the job needs {spec.resources.workers} workers but the cluster can give at most "
            f"{limits.cluster_workers}",
        )
    if spec.resources.device == "gpu" and limits.cluster_gpus is not None:
        if limits.cluster_gpus == 0:
            raise Invalid(
                ("body", "resources", "device"),
                'the cluster has no GPU, so a "gpu" job would wait for one forever: '
                'use device "cpu"',
            )
        if spec.resources.workers > limits.cluster_gpus:
            raise Invalid(
                ("body", "resources", "workers"),
                f"each GPU worker takes a GPU: the job needs {spec.resources.workers} but "
                f"the cluster has {limits.cluster_gpus}",
            )


#: Columns a submission sets; the others start NULL.
_SUBMITTED = (
    "team_id",
    "name",
    "status",
    "spec",
    "dataset_name",
    "dataset_version",
    "priority",
    "max_retries",
    "attempts",
    "idempotency_key",
    "cancel_requested",
    "available_at",
    "created_at",
)


@functools.cache
def _insert_statement(dialect: str, by_version: bool, keyed: bool) -> Any:
    """``INSERT INTO jobs ... SELECT ... RETURNING id``, storing nothing unless the
    dataset the submission was validated against is still the one its name resolves
    to (and, when ``keyed``, unless the team used the idempotency key already).
    Built once per shape: its parameters are bound by name."""
    jobs = Job.metadata.tables[Job.__tablename__]
    params = {name: bindparam(name, type_=jobs.c[name].type) for name in _SUBMITTED}
    chosen = (
        select(*params.values())
        .select_from(DatasetVersion)
        .where(
            DatasetVersion.id == bindparam("dataset_id"),
            # the chosen version's name is the one asked for, and so is its number
            # when the spec named one
            DatasetVersion.id
            == resolved_id(
                team_id=params["team_id"],
                name=params["dataset_name"],
                version=params["dataset_version"] if by_version else None,
            ),
        )
    )
    statement = (postgresql.insert if dialect == "postgresql" else sqlite.insert)(jobs)
    statement = statement.from_select(list(_SUBMITTED), chosen)
    if keyed:
        statement = statement.on_conflict_do_nothing(index_elements=["team_id", "idempotency_key"])
    return statement.returning(jobs.c.id)


def _insert_job(
    session: Session,
    team: Team,
    spec: JobSpec,
    stored: dict[str, Any],
    dataset: ChosenDataset,
    idempotency_key: str | None,
) -> Job | None:
    """The new job, or None when it was not stored (see :func:`_insert_statement`)."""
    now = utcnow()
    values: dict[str, Any] = {
        "team_id": team.id,
        "name": spec.name,
        "status": JobStatus.queued,
        "spec": stored,
        "dataset_name": dataset.name,
        "dataset_version": dataset.version,
        "priority": spec.priority,
        "max_retries": spec.max_retries,
        "attempts": 0,
        "idempotency_key": idempotency_key,
        "cancel_requested": False,
        "available_at": now,
        "created_at": now,
    }
    statement = _insert_statement(
        session.get_bind().dialect.name,
        spec.dataset.version is not None,
        idempotency_key is not None,
    )
    connection = begin_single_write(session)
    job_id = connection.execute(statement, values | {"dataset_id": dataset.id}).scalar()
    session.commit()
    if job_id is None:
        return None
    return Job(
        id=job_id, error=None, final_metrics=None, started_at=None, finished_at=None, **values
    )


def _by_idempotency_key(session: Session, team: Team, key: str) -> Job | None:
    return session.scalars(
        select(Job).where(Job.team_id == team.id, Job.idempotency_key == key)
    ).first()


def _same_request(job: Job, stored: dict[str, Any]) -> Job:
    if stored != job.spec:
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


def run_events_of(*, session: Session, job: Job, after_id: int = 0) -> list[RunEvent]:
    """The job's run events in the order they happened; ``after_id`` skips those
    up to that row."""
    return list(
        session.scalars(
            select(RunEvent)
            .where(RunEvent.job_id == job.id, RunEvent.id > after_id)
            .order_by(RunEvent.id)
        )
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
