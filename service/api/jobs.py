"""Routes under /api/v1/jobs."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import PlainTextResponse, StreamingResponse
from pydantic import BaseModel
from sqlalchemy.orm import Session

from core import JobSpec
from service import jobs as job_service
from service import results
from service.api.body import json_body_openapi, read_json_object, read_model
from service.api.deps import ContextDep, SessionDep, StoreDep, TeamDep
from service.artifacts import ArtifactStore
from service.datasets import resolve_version
from service.errors import Invalid, NotFound
from service.models import TERMINAL_STATUSES, Job, JobStatus, Team
from service.predict import ModelCache, predict
from service.schemas import (
    STREAM_END,
    AttemptPublic,
    CheckpointPublic,
    CheckpointsPublic,
    JobDetail,
    JobPublic,
    JobsPublic,
    PredictRequest,
    PredictResponse,
    RunEventPublic,
)

router = APIRouter(prefix="/jobs", tags=["jobs"])
EVENTS_POLL_S = 0.5
#: Longest an events stream stays silent: then it sends a comment (see job_events).
EVENTS_KEEPALIVE_S = 15.0
_models = ModelCache()


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=JobPublic,
    openapi_extra=json_body_openapi(JobSpec),
)
async def submit_job(
    request: Request,
    response: Response,
    context: ContextDep,
    session: SessionDep,
    team: TeamDep,
    idempotency_key: Annotated[str | None, Header(max_length=128)] = None,
) -> JobPublic:
    body = await read_json_object(request, context.settings.max_body_bytes)
    job, created = await run_in_threadpool(
        job_service.create_job,
        session=session,
        team=team,
        body=body,
        limits=context.limits,
        idempotency_key=idempotency_key,
        cache=context.submissions,
    )
    if not created:
        response.status_code = status.HTTP_200_OK
    return (await run_in_threadpool(_public, session, [job]))[0]


@router.get("", response_model=JobsPublic)
def list_jobs(
    session: SessionDep,
    team: TeamDep,
    status_: Annotated[JobStatus | None, Query(alias="status")] = None,
    name: Annotated[str | None, Query(max_length=128)] = None,
    cursor: Annotated[int | None, Query(ge=1)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> JobsPublic:
    page, total, next_cursor = job_service.list_jobs(
        session=session, team=team, status=status_, name=name, cursor=cursor, limit=limit
    )
    return JobsPublic(
        data=_public(session, page),
        count=total,
        next_cursor=str(next_cursor) if next_cursor is not None else None,
    )


@router.get("/{job_id}", response_model=JobDetail)
def get_job(job_id: int, session: SessionDep, team: TeamDep) -> JobDetail:
    job = job_service.get_job(session=session, team=team, job_id=job_id)
    attempts = job_service.attempts_of(session=session, job=job)
    queue_wait = (job.started_at - job.created_at).total_seconds() if job.started_at else None
    run_time = (
        (job.finished_at - job.started_at).total_seconds()
        if job.finished_at and job.started_at
        else None
    )
    return JobDetail(
        **_public(session, [job])[0].model_dump(),
        attempt_history=[AttemptPublic.model_validate(a) for a in attempts],
        run_events=[
            RunEventPublic.model_validate(e)
            for e in job_service.run_events_of(session=session, job=job)
        ],
        jobs_ahead=job_service.jobs_ahead(session=session, job=job),
        queue_wait_s=queue_wait,
        run_time_s=run_time,
        has_model=job.model_sha256 is not None,
    )


@router.post("/{job_id}/cancel", response_model=JobPublic)
def cancel_job(job_id: int, session: SessionDep, team: TeamDep) -> JobPublic:
    job = job_service.cancel(session=session, team=team, job_id=job_id)
    return _public(session, [job])[0]


def _public(session: Session, jobs: list[Job]) -> list[JobPublic]:
    """The jobs as the API shows them, with their progress (one query for all)."""
    progress = results.progress_of(session=session, jobs=jobs)
    fields = [name for name in JobPublic.model_fields if name != "progress"]
    return [
        JobPublic.model_validate(
            {**{name: getattr(job, name) for name in fields}, "progress": progress[job.id]}
        )
        for job in jobs
    ]


@router.get("/{job_id}/metrics", response_model=None)
def get_metrics(
    job_id: int,
    session: SessionDep,
    team: TeamDep,
    names: Annotated[str | None, Query(description="comma-separated series names")] = None,
    since_step: Annotated[int | None, Query(ge=-1)] = None,
    max_points: Annotated[int | None, Query(ge=2, le=results.MAX_POINTS_LIMIT)] = None,
    format: Annotated[str, Query(pattern="^(json|csv)$")] = "json",
) -> object:
    job = job_service.get_job(session=session, team=team, job_id=job_id)
    wanted = [n for n in names.split(",") if n] if names else None
    series = results.read_series(
        session=session, job=job, names=wanted, since_step=since_step, max_points=max_points
    )
    if format == "csv":
        return PlainTextResponse(results.series_csv(series), media_type="text/csv")
    return {"job_id": job.id, **results.series_json(series)}


@router.get("/{job_id}/checkpoints", response_model=CheckpointsPublic)
def get_checkpoints(job_id: int, session: SessionDep, team: TeamDep) -> CheckpointsPublic:
    job = job_service.get_job(session=session, team=team, job_id=job_id)
    rows = results.list_checkpoints(session=session, job=job)
    return CheckpointsPublic(
        data=[CheckpointPublic.model_validate(c) for c in rows], count=len(rows)
    )


@router.get("/{job_id}/checkpoints/{epoch}")
def download_checkpoint(
    job_id: int, epoch: int, session: SessionDep, team: TeamDep, store: StoreDep
) -> Response:
    """The ``.npz`` saved at the end of ``epoch``: weights, optimizer, RNG, position."""
    job = job_service.get_job(session=session, team=team, job_id=job_id)
    rows = results.list_checkpoints(session=session, job=job)  # one a epoch: a few
    checkpoint = next((row for row in rows if row.epoch == epoch), None)
    if checkpoint is None:
        raise NotFound(f"job {job_id} has no checkpoint of epoch {epoch}")
    return _npz_download(store, checkpoint.sha256, f"job-{job.id}-epoch-{epoch}.npz")


@router.get("/{job_id}/model")
def download_model(job_id: int, session: SessionDep, team: TeamDep, store: StoreDep) -> Response:
    job = job_service.get_job(session=session, team=team, job_id=job_id)
    if job.model_sha256 is None:
        raise NotFound(f"job {job_id} has no model yet (status {job.status})")
    return _npz_download(store, job.model_sha256, f"job-{job.id}-model.npz")


def _npz_download(store: ArtifactStore, sha256: str, filename: str) -> Response:
    """A stored ``.npz`` as a download; its digest is its ETag (it never changes)."""
    return Response(
        store.get(sha256),
        media_type="application/octet-stream",
        headers={
            "Content-Disposition": f'attachment; filename="{filename}"',
            "ETag": f'"{sha256}"',
        },
    )


@router.post(
    "/{job_id}/predict",
    response_model=PredictResponse,
    openapi_extra=json_body_openapi(PredictRequest),
)
async def predict_route(
    job_id: int,
    request: Request,
    context: ContextDep,
    session: SessionDep,
    team: TeamDep,
    store: StoreDep,
) -> PredictResponse:
    # The body first, as FastAPI checks a declared one: a bad body is 422 whatever the job.
    body = await read_model(request, context.settings.max_body_bytes, PredictRequest)
    model_sha256, input_shape = await run_in_threadpool(
        _model_of, session=session, team=team, job_id=job_id
    )
    loaded = await run_in_threadpool(_models.get, store, model_sha256, input_shape)
    outputs, predicted = await run_in_threadpool(
        partial(predict, max_new_tokens=body.max_new_tokens, temperature=body.temperature),
        loaded,
        body.inputs,
    )
    return PredictResponse(outputs=outputs, predictions=predicted)


def _model_of(*, session: Session, team: Team, job_id: int) -> tuple[str, tuple[int, ...]]:
    """The job's model (its digest) and the input shape of its dataset, in a worker
    thread: the two queries block."""
    job = job_service.get_job(session=session, team=team, job_id=job_id)
    if job.model_sha256 is None:
        raise NotFound(f"job {job_id} has no model yet (status {job.status})")
    dataset = resolve_version(
        session=session, team=team, name=job.dataset_name, version=job.dataset_version
    )
    return job.model_sha256, tuple(dataset.input_shape) if dataset else ()


@dataclass(frozen=True)
class Polled:
    """What one poll of the events stream read, in one session."""

    status: str
    series: results.Series
    attempts: list[dict[str, Any]]
    run_events: list[tuple[int, dict[str, Any]]]  # (row id, as sent)


def _json(schema: type[BaseModel], row: object) -> dict[str, Any]:
    return schema.model_validate(row).model_dump(mode="json")


def _resume_point(last_event_id: str | None) -> tuple[int, int]:
    """Where a reconnecting client's ``Last-Event-ID`` says to go on: metric rows after
    a step, run events after an id."""
    if last_event_id is None:
        return -1, 0
    step, _, event = last_event_id.partition(".")
    try:
        return int(step), int(event)
    except ValueError:
        raise Invalid(
            ("header", "Last-Event-ID"),
            f"{last_event_id!r} is not an id this stream sent (STEP.EVENT, or {STREAM_END!r})",
        ) from None


@router.get("/{job_id}/events", response_model=None)
async def job_events(
    job_id: int,
    request: Request,
    context: ContextDep,
    session: SessionDep,
    team: TeamDep,
    last_event_id: Annotated[str | None, Header(max_length=64)] = None,
) -> StreamingResponse | Response:
    """Server-sent events: ``run`` for each run event (workers started or failed, a
    divergence rolled back), ``metric`` rows as they arrive, ``attempt`` when an attempt
    starts or ends (so a retry between two polls is still seen), and ``status`` when
    the job's status changes.

    Each event's ``id`` says where a reconnection (``Last-Event-ID``) goes on: run
    events after the last sent, metric rows from the step every series had reached
    (at least once: a row may come again, the same ``(name, step)``), the attempts and
    the status as they are then. The terminal status has the id ``end``: a client that
    reconnects after it gets 204, which tells a browser's EventSource to stop."""
    job = await run_in_threadpool(job_service.get_job, session=session, team=team, job_id=job_id)
    if last_event_id == STREAM_END:
        return Response(status_code=status.HTTP_204_NO_CONTENT)
    floor, after_event = _resume_point(last_event_id)
    factory = context.session_factory

    def poll(last_step: int, last_event: int) -> Polled:
        with factory() as poll_session:
            current = poll_session.get(Job, job.id)
            assert current is not None
            series = results.read_series(session=poll_session, job=current, since_step=last_step)
            attempts = job_service.attempts_of(session=poll_session, job=current)
            events = job_service.run_events_of(
                session=poll_session, job=current, after_id=last_event
            )
            return Polled(
                status=current.status,
                series=series,
                attempts=[_json(AttemptPublic, a) for a in attempts],
                run_events=[(e.id, _json(RunEventPublic, e)) for e in events],
            )

    async def stream() -> AsyncIterator[str]:
        last_status: str | None = None
        seen: dict[str, int] = {}  # series name -> last step sent
        attempts_sent: dict[int, dict[str, Any]] = {}  # attempt number -> as last sent
        last_event = after_event  # id of the last run event sent
        quiet_since = time.monotonic()  # when anything was last sent

        def reached() -> int:
            """The step every series sent has reached: metric rows after it are read."""
            return min(seen.values()) if seen else floor

        def sent(kind: str, data: dict[str, Any], event_id: str | None = None) -> str:
            nonlocal quiet_since
            quiet_since = time.monotonic()
            event_id = event_id or f"{reached()}.{last_event}"
            return f"event: {kind}\nid: {event_id}\ndata: {json.dumps(data)}\n\n"

        while True:
            polled = await run_in_threadpool(poll, reached(), last_event)
            fresh = sorted(
                (step, name, value)
                for name, points in polled.series.items()
                for step, value in points
                if step > seen.get(name, floor)
            )
            # Run events first: replaying a job that has ended, "2 workers on 1 node(s)"
            # comes before its epochs (live, each comes within a poll of happening).
            for event_id, event in polled.run_events:
                last_event = event_id
                yield sent("run", event)
            for step, name, value in fresh:  # in the order training produced them
                seen[name] = step
                yield sent("metric", {"name": name, "step": step, "value": value})
            for attempt in polled.attempts:
                if attempts_sent.get(attempt["number"]) != attempt:
                    attempts_sent[attempt["number"]] = attempt
                    yield sent("attempt", attempt)
            ended = polled.status in TERMINAL_STATUSES
            if polled.status != last_status:
                last_status = polled.status
                yield sent("status", {"status": polled.status}, STREAM_END if ended else None)
            if ended or await request.is_disconnected():
                return
            if time.monotonic() - quiet_since >= EVENTS_KEEPALIVE_S:
                # A comment, which clients skip: an idle proxy keeps the connection
                # open, and a client learns that the server is still there.
                quiet_since = time.monotonic()
                yield ": keepalive\n\n"
            await asyncio.sleep(EVENTS_POLL_S)

    return StreamingResponse(stream(), media_type="text/event-stream")
