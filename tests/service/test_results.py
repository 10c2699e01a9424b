from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest
from sqlalchemy import select

from service import queue
from service.models import Job, JobStatus, RunEvent
from service.results import read_series
from tests.service.conftest import Api
from tests.service.test_jobs_api import _job


def _running_job(api: Api) -> tuple[int, int]:
    job = api.client.post("/api/v1/jobs", json=_job(), headers=api.a).json()
    claimed = queue.claim_next_job(
        session_factory=api.context.session_factory, owner="t", lease_s=60
    )
    assert claimed is not None and claimed.id == job["id"]
    return job["id"], claimed.attempt


def test_downsampling_keeps_first_last_and_extremes(api: Api) -> None:
    job_id, attempt = _running_job(api)
    points = [(i, math.sin(i / 50.0)) for i in range(10_000)]
    points[4321] = (4321, 99.0)
    points[777] = (777, -99.0)
    queue.write_metrics(
        session_factory=api.context.session_factory,
        job_id=job_id,
        attempt=attempt,
        rows=[("loss", step, value) for step, value in points],
    )
    url = f"/api/v1/jobs/{job_id}/metrics"
    loss = api.client.get(url, params={"max_points": 200}, headers=api.a).json()["series"]["loss"]
    kept = list(zip(loss["steps"], loss["values"], strict=True))
    assert len(kept) <= 200
    assert kept[0] == points[0] and kept[-1] == points[-1]
    assert (4321, 99.0) in kept and (777, -99.0) in kept
    assert [s for s, _ in kept] == sorted({s for s, _ in kept})
    assert set(kept) <= set(points)


def _reference_downsample(
    points: list[tuple[int, float]], max_points: int
) -> list[tuple[int, float]]:
    """Each bucket's minimum and maximum (the earliest step among equal values) and
    the ends, with buckets of ceil(steps / ((max_points - 2) // 2)) steps."""
    if len(points) <= max_points:
        return points
    first, last = points[0][0], points[-1][0]
    buckets = (max_points - 2) // 2
    kept = {points[0], points[-1]}
    if buckets:
        width = -(-(last - first + 1) // buckets)
        by_bucket: dict[int, list[tuple[int, float]]] = {}
        for step, value in points:
            by_bucket.setdefault((step - first) // width, []).append((step, value))
        for members in by_bucket.values():
            kept.add(min(members, key=lambda p: (p[1], p[0])))
            kept.add(max(members, key=lambda p: (p[1], -p[0])))
    return sorted(kept)


@pytest.mark.parametrize("max_points", [2, 3, 4, 7, 50, 333])
def test_downsampling_matches_a_reference(api: Api, max_points: int) -> None:
    job_id, attempt = _running_job(api)
    rng = np.random.default_rng(max_points)
    steps = np.sort(rng.choice(20_000, size=3_000, replace=False)) + 5
    # few distinct values, so that buckets have ties for their extremes
    values = rng.integers(-20, 20, size=len(steps)) / 4
    points = [(int(s), float(v)) for s, v in zip(steps, values, strict=True)]
    queue.write_metrics(
        session_factory=api.context.session_factory,
        job_id=job_id,
        attempt=attempt,
        rows=[("loss", step, value) for step, value in points]
        + [("other", step, -value) for step, value in points[:100]],
    )
    since = points[400][0]
    with api.context.session_factory() as session:
        job = session.get(Job, job_id)
        assert job is not None
        whole = read_series(session=session, job=job, max_points=max_points)
        after = read_series(session=session, job=job, since_step=since, max_points=max_points)
    assert whole["loss"] == _reference_downsample(points, max_points)
    assert whole["other"] == _reference_downsample([(s, -v) for s, v in points[:100]], max_points)
    assert after["loss"] == _reference_downsample(points[401:], max_points)
    assert all(len(series) <= max_points for series in (*whole.values(), *after.values()))


def test_metrics_filters_downsampling_and_csv(api: Api) -> None:
    job_id, attempt = _running_job(api)
    rows = [("loss", step, 1.0 / step) for step in range(1, 1001)]
    rows += [("val_accuracy", step, step / 1000) for step in (250, 500, 750, 1000)]
    assert queue.write_metrics(
        session_factory=api.context.session_factory, job_id=job_id, attempt=attempt, rows=rows
    )
    url = f"/api/v1/jobs/{job_id}/metrics"
    full = api.client.get(url, headers=api.a).json()["series"]
    assert len(full["loss"]["steps"]) == 1000 and full["val_accuracy"]["values"][-1] == 1.0
    named = api.client.get(url, params={"names": "val_accuracy"}, headers=api.a).json()["series"]
    assert list(named) == ["val_accuracy"]
    since = api.client.get(url, params={"since_step": 990, "names": "loss"}, headers=api.a).json()
    assert since["series"]["loss"]["steps"] == list(range(991, 1001))
    small = api.client.get(url, params={"max_points": 50}, headers=api.a).json()["series"]
    assert len(small["loss"]["steps"]) <= 50 and small["loss"]["values"][0] == 1.0
    text = api.client.get(url, params={"format": "csv", "names": "val_accuracy"}, headers=api.a)
    assert text.headers["content-type"].startswith("text/csv")
    assert text.text.splitlines() == [
        "name,step,value",
        "val_accuracy,250,0.25",
        "val_accuracy,500,0.5",
        "val_accuracy,750,0.75",
        "val_accuracy,1000,1.0",
    ]
    assert api.client.get(url, params={"max_points": 1}, headers=api.a).status_code == 422


def _read_events(
    api: Api, job_id: int, last_event_id: str | None = None
) -> tuple[int, list[tuple[str, str, dict[str, Any]]]]:
    """The status code and the ``(event, id, data)`` of a job's events stream."""
    headers = {**api.a, **({"Last-Event-ID": last_event_id} if last_event_id else {})}
    sent = []
    with api.client.stream("GET", f"/api/v1/jobs/{job_id}/events", headers=headers) as response:
        if response.status_code == 200:
            assert response.headers["content-type"].startswith("text/event-stream")
        fields: dict[str, str] = {}
        for line in response.iter_lines():
            name, _, value = line.partition(":")
            if name in ("event", "id"):
                fields[name] = value.strip()
            elif name == "data":
                sent.append((fields.pop("event"), fields.pop("id"), json.loads(value)))
    return response.status_code, sent


def test_events_stream_status_and_metrics_until_the_job_ends(api: Api) -> None:
    job_id, attempt = _running_job(api)
    factory = api.context.session_factory
    queue.write_metrics(
        session_factory=factory,
        job_id=job_id,
        attempt=attempt,
        rows=[("val_loss", 10, 0.5), ("loss", 5, 0.9), ("loss", 10, 0.7)],
    )
    for kind, message in (("diverged", "non-finite loss"), ("restored", "rolled back")):
        assert queue.record_event(
            session_factory=factory,
            job_id=job_id,
            attempt=attempt,
            kind=kind,
            epoch=0,
            step=7,
            message=message,
        )
    queue.finish_attempt(
        session_factory=factory, job_id=job_id, attempt=attempt, status=queue.JobStatus.succeeded
    )
    code, sent = _read_events(api, job_id)
    assert code == 200
    events = [(kind, data) for kind, _, data in sent]
    detail = api.client.get(f"/api/v1/jobs/{job_id}", headers=api.a).json()
    ended = detail["attempt_history"]
    assert [(e["kind"], e["message"], e["step"]) for e in detail["run_events"]] == [
        ("diverged", "non-finite loss", 7),
        ("restored", "rolled back", 7),
    ]
    assert events == [
        *(("run", event) for event in detail["run_events"]),
        ("metric", {"name": "loss", "step": 5, "value": 0.9}),
        ("metric", {"name": "loss", "step": 10, "value": 0.7}),
        ("metric", {"name": "val_loss", "step": 10, "value": 0.5}),
        ("attempt", ended[0]),
        ("status", {"status": "succeeded"}),
    ]
    # each id says where a reconnection goes on: metric rows after the step every
    # series had reached, run events after the last one sent; the last one ends it
    with factory() as session:
        first, second = session.scalars(select(RunEvent.id).order_by(RunEvent.id))
    assert [event_id for _, event_id, _ in sent] == [
        f"-1.{first}",
        f"-1.{second}",
        f"5.{second}",
        f"10.{second}",
        f"10.{second}",
        f"10.{second}",
        "end",
    ]
    code, resumed = _read_events(api, job_id, last_event_id=f"5.{first}")
    assert [(kind, data) for kind, _, data in resumed] == [events[1], *events[3:]]
    assert _read_events(api, job_id, last_event_id="end") == (204, [])
    refused = api.client.get(
        f"/api/v1/jobs/{job_id}/events", headers={**api.a, "Last-Event-ID": "next"}
    )
    assert refused.status_code == 422
    assert refused.json()["detail"][0]["loc"] == ["header", "Last-Event-ID"]
    assert ended[0]["number"] == attempt and ended[0]["status"] == "succeeded"


def test_the_final_result_and_its_metrics_are_written_together_by_the_owner_only(
    api: Api,
) -> None:
    job_id, attempt = _running_job(api)
    factory = api.context.session_factory

    def finish(attempt: int, accuracy: float) -> bool:
        return queue.finish_attempt(
            session_factory=factory,
            job_id=job_id,
            attempt=attempt,
            status=JobStatus.succeeded,
            final_metrics={"test_accuracy": accuracy},
            model_sha256="0" * 64,
            metrics=[("test_accuracy", 40, accuracy)],
        )

    def stored() -> tuple[JobStatus, dict | None, dict]:
        with factory() as session:
            job = session.get(Job, job_id)
            assert job is not None
            return job.status, job.final_metrics, read_series(session=session, job=job)

    assert not finish(attempt + 1, 0.5)  # not the attempt that owns the job
    assert stored() == (JobStatus.running, None, {})
    assert finish(attempt, 0.9)
    assert stored() == (
        JobStatus.succeeded,
        {"test_accuracy": 0.9},
        {"test_accuracy": [(40, 0.9)]},
    )
    assert not finish(attempt, 0.7)  # the job has ended: nothing changes, nothing doubles
    assert stored()[2] == {"test_accuracy": [(40, 0.9)]}


def test_progress_counts_epochs_done_and_estimates_the_time_left(api: Api) -> None:
    spec = _job(training={"epochs": 5, "batch_size": 64})
    queued = api.client.post("/api/v1/jobs", json=spec, headers=api.a).json()
    assert queued["progress"] == {"epochs_done": 0, "epochs": 5, "eta_s": None}
    job_id = queued["id"]
    factory = api.context.session_factory
    claimed = queue.claim_next_job(session_factory=factory, owner="t", lease_s=60)
    assert claimed is not None and claimed.id == job_id
    attempt = claimed.attempt
    other = api.client.post("/api/v1/jobs", json=_job(), headers=api.a).json()["id"]
    queue.write_metrics(
        session_factory=factory,
        job_id=job_id,
        attempt=attempt,
        rows=[("epoch", 10, 1.0), ("epoch_time_s", 10, 3.0), ("loss", 15, 0.5)]
        + [("epoch", 20, 2.0), ("epoch_time_s", 20, 5.0)],
    )
    running = {"epochs_done": 2, "epochs": 5, "eta_s": 12.0}  # 3 epochs left of 4 s each
    assert api.client.get(f"/api/v1/jobs/{job_id}", headers=api.a).json()["progress"] == running
    listed = api.client.get("/api/v1/jobs", headers=api.a).json()["data"]
    assert {job["id"]: job["progress"] for job in listed} == {
        job_id: running,
        other: {"epochs_done": 0, "epochs": 2, "eta_s": None},
    }
    queue.finish_attempt(
        session_factory=factory, job_id=job_id, attempt=attempt, status=queue.JobStatus.failed
    )
    ended = api.client.get(f"/api/v1/jobs/{job_id}", headers=api.a).json()["progress"]
    assert ended == {"epochs_done": 2, "epochs": 5, "eta_s": None}
