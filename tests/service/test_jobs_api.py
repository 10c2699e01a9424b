from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import func, select, update

from service import queue
from service.db import utcnow
from service.models import Job, JobStatus
from tests.service.conftest import Api

DIGITS_JOB = {
    "name": "digits-mlp",
    "dataset": {"name": "digits"},
    "model": {
        "layers": [
            {"type": "flatten"},
            {"type": "dense", "units": 32},
            {"type": "relu"},
            {"type": "dense", "units": 10},
        ],
        "loss": "softmax_cross_entropy",
    },
    "optimizer": {"type": "adam", "lr": 0.01},
    "training": {"epochs": 2, "batch_size": 64},
    "resources": {"workers": 1},
}


def _job(**changes: object) -> dict:
    spec = copy.deepcopy(DIGITS_JOB)
    spec.update(changes)
    return spec


def _stored_jobs(api: Api) -> int:
    with api.context.session_factory() as session:
        return session.scalar(select(func.count()).select_from(Job)) or 0


def test_moments_are_utc_and_say_so(api: Api) -> None:
    before = datetime.now(UTC)
    job = api.client.post("/api/v1/jobs", json=_job(), headers=api.a).json()
    cancelled = api.client.post(f"/api/v1/jobs/{job['id']}/cancel", headers=api.a).json()
    dataset = api.client.get("/api/v1/datasets/digits", headers=api.a).json()["data"][0]
    after = datetime.now(UTC)
    for text in (job["created_at"], cancelled["finished_at"]):
        assert text.endswith("Z")
        assert before <= datetime.fromisoformat(text) <= after
    assert dataset["created_at"].endswith("Z")


def test_submit_then_read_list_and_cancel(api: Api) -> None:
    created = api.client.post("/api/v1/jobs", json=_job(), headers=api.a)
    assert created.status_code == 201, created.text
    job = created.json()
    assert job["status"] == "queued" and job["dataset_version"] == 1
    detail = api.client.get(f"/api/v1/jobs/{job['id']}", headers=api.a).json()
    assert detail["jobs_ahead"] == 0 and detail["attempt_history"] == []
    assert detail["spec"]["model"]["layers"][1]["units"] == 32
    second = api.client.post("/api/v1/jobs", json=_job(name="other"), headers=api.a).json()
    assert api.client.get(f"/api/v1/jobs/{second['id']}", headers=api.a).json()["jobs_ahead"] == 1

    listed = api.client.get("/api/v1/jobs", headers=api.a).json()
    assert [j["id"] for j in listed["data"]] == [second["id"], job["id"]]
    assert listed["count"] == 2
    only = api.client.get("/api/v1/jobs", params={"name": "other"}, headers=api.a).json()
    assert [j["id"] for j in only["data"]] == [second["id"]]

    cancelled = api.client.post(f"/api/v1/jobs/{job['id']}/cancel", headers=api.a)
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    queued = api.client.get("/api/v1/jobs", params={"status": "queued"}, headers=api.a).json()
    assert [j["id"] for j in queued["data"]] == [second["id"]]


def _row(api: Api, job_id: int) -> tuple:
    with api.context.session_factory() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return (job.status, job.cancel_requested, job.finished_at, job.error, job.attempts)


def _claim(api: Api, job_id: int) -> int:
    """Claim the job as a dispatcher would; its attempt number."""
    claimed = queue.claim_next_job(
        session_factory=api.context.session_factory, owner="test", lease_s=60
    )
    assert claimed is not None and claimed.id == job_id
    return claimed.attempt


def test_cancelling_a_running_job_asks_it_to_stop(api: Api) -> None:
    job_id = api.client.post("/api/v1/jobs", json=_job(), headers=api.a).json()["id"]
    _claim(api, job_id)
    for _ in range(2):  # asking again is no conflict: the job has not ended yet
        response = api.client.post(f"/api/v1/jobs/{job_id}/cancel", headers=api.a)
        assert response.status_code == 200, response.text
        body = response.json()
        assert (body["status"], body["cancel_requested"]) == ("running", True)
        assert body["finished_at"] is None


@pytest.mark.parametrize("ending", ["succeeded", "failed", "cancelled"])
def test_cancelling_a_job_that_ended_is_409_and_changes_nothing(api: Api, ending: str) -> None:
    job_id = api.client.post("/api/v1/jobs", json=_job(), headers=api.a).json()["id"]
    if ending == "cancelled":
        first = api.client.post(f"/api/v1/jobs/{job_id}/cancel", headers=api.a)
        assert first.status_code == 200 and first.json()["status"] == "cancelled"
    else:
        attempt = _claim(api, job_id)
        assert queue.finish_attempt(
            session_factory=api.context.session_factory,
            job_id=job_id,
            attempt=attempt,
            status=JobStatus(ending),
            error="boom" if ending == "failed" else None,
        )
    before = _row(api, job_id)
    assert before[0] == ending

    response = api.client.post(f"/api/v1/jobs/{job_id}/cancel", headers=api.a)
    assert response.status_code == 409, response.text
    words = "been cancelled" if ending == "cancelled" else ending
    assert response.json() == {"detail": f"job {job_id} has already {words}"}
    assert _row(api, job_id) == before
    assert before[1] == (ending == "cancelled")  # a finished job was never asked to stop


def test_cursor_pagination_walks_every_job_once(api: Api) -> None:
    ids = [
        api.client.post("/api/v1/jobs", json=_job(name=f"j{i}"), headers=api.a).json()["id"]
        for i in range(7)
    ]
    seen, cursor = [], None
    while True:
        params = {"limit": 3} | ({"cursor": cursor} if cursor else {})
        page = api.client.get("/api/v1/jobs", params=params, headers=api.a).json()
        seen += [j["id"] for j in page["data"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == sorted(ids, reverse=True)


def test_idempotency_key_returns_the_same_job(api: Api) -> None:
    key = {"Idempotency-Key": "nightly-2026-11-28"}
    headers = api.a | key
    first = api.client.post("/api/v1/jobs", json=_job(), headers=headers)
    again = api.client.post("/api/v1/jobs", json=_job(), headers=headers)
    assert (first.status_code, again.status_code) == (201, 200)
    assert first.json()["id"] == again.json()["id"]
    assert _stored_jobs(api) == 1
    different = api.client.post("/api/v1/jobs", json=_job(name="changed"), headers=headers)
    assert different.status_code == 409
    other_team = api.client.post("/api/v1/jobs", json=_job(), headers=api.b | key)
    assert other_team.status_code == 201 and other_team.json()["id"] != first.json()["id"]


BAD_SPECS = [
    ({"units": 0}, ["body", "model", "layers", 1, "units"]),
    ({"type": "dense", "units": 10, "colour": "red"}, ["body", "model", "layers", 1, "colour"]),
    ({"type": "convolution"}, ["body", "model", "layers", 1, "type"]),
]


@pytest.mark.parametrize(("layer", "loc"), BAD_SPECS, ids=["units", "extra", "type"])
def test_invalid_layer_is_422_naming_the_field(api: Api, layer: dict, loc: list) -> None:
    spec = _job()
    spec["model"]["layers"][1] = {"type": "dense", **layer} if "type" not in layer else layer
    response = api.client.post("/api/v1/jobs", json=spec, headers=api.a)
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == loc
    assert _stored_jobs(api) == 0


@pytest.mark.parametrize(
    ("change", "loc", "words"),
    [
        (
            {
                "model": {
                    "layers": [{"type": "conv2d", "filters": 4, "kernel_size": 9}],
                    "loss": "mse",
                }
            },
            ["body", "model", "layers", 0, "kernel_size"],
            "larger than the padded input",
        ),
        (
            {
                "model": {
                    "layers": [{"type": "flatten"}, {"type": "dense", "units": 3}],
                    "loss": "softmax_cross_entropy",
                }
            },
            ["body", "model", "loss"],
            "10 classes",
        ),
        ({"dataset": {"name": "nope"}}, ["body", "dataset", "name"], "no dataset named"),
        ({"dataset": {"name": "digits", "version": 7}}, ["body", "dataset", "name"], "version 7"),
        ({"resources": {"workers": 0}}, ["body", "resources", "workers"], "greater than"),
        ({"resources": {"workers": 65}}, ["body", "resources", "workers"], "less than"),
        ({"training": {"epochs": 0}}, ["body", "training", "epochs"], "greater than"),
        ({"optimizer": {"type": "adam", "lr": -1}}, ["body", "optimizer", "lr"], "greater than"),
        (
            {
                "model": {
                    "layers": [
                        {"type": "flatten"},
                        {"type": "dense", "units": 65536},
                        {"type": "dense", "units": 65536},
                        {"type": "dense", "units": 10},
                    ],
                    "loss": "softmax_cross_entropy",
                }
            },
            ["body", "model", "layers"],
            "parameters",
        ),
    ],
    ids=[
        "kernel",
        "loss",
        "dataset",
        "version",
        "workers-low",
        "workers-high",
        "epochs",
        "lr",
        "params",
    ],
)
def test_bad_job_is_422_and_stores_nothing(api: Api, change: dict, loc: list, words: str) -> None:
    response = api.client.post("/api/v1/jobs", json=_job(**change), headers=api.a)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"][0]
    assert detail["loc"] == loc
    assert words in detail["msg"]
    assert _stored_jobs(api) == 0


def test_more_workers_than_the_cluster_has_is_refused(api: Api) -> None:
    api.context.cluster_workers = 2
    response = api.client.post("/api/v1/jobs", json=_job(resources={"workers": 3}), headers=api.a)
    assert response.status_code == 422
    assert "at most 2" in response.json()["detail"][0]["msg"]
    assert _stored_jobs(api) == 0


def test_malformed_and_oversized_bodies(api: Api) -> None:
    bad_json = api.client.post(
        "/api/v1/jobs", content=b"{not json", headers=api.a | {"Content-Type": "application/json"}
    )
    assert bad_json.status_code == 400 and "JSON" in bad_json.json()["detail"]
    not_object = api.client.post("/api/v1/jobs", json=[1, 2], headers=api.a)
    assert not_object.status_code == 422
    big = {"name": "x" * (api.context.settings.max_body_bytes + 1)}
    too_large = api.client.post("/api/v1/jobs", json=big, headers=api.a)
    assert too_large.status_code == 413
    assert _stored_jobs(api) == 0


BAD_PREDICT_BODIES = [
    ({"input": [[0]]}, ["body", "inputs"], "field required"),
    ({}, ["body", "inputs"], "field required"),
    ({"inputs": "abc"}, ["body", "inputs"], "valid list"),
    ({"inputs": [1], "max_new_tokens": -1}, ["body", "max_new_tokens"], "greater than or equal"),
    ({"inputs": [1], "temperature": "hot"}, ["body", "temperature"], "valid number"),
    ({"inputs": [1], "colour": "red"}, ["body", "colour"], "unknown field"),
]


@pytest.mark.parametrize(
    ("body", "loc", "words"),
    BAD_PREDICT_BODIES,
    ids=["misspelt", "empty", "not-a-list", "tokens", "temperature", "extra"],
)
def test_bad_predict_body_is_422_naming_the_field(
    api: Api, body: dict, loc: list, words: str
) -> None:
    job_id = api.client.post("/api/v1/jobs", json=_job(), headers=api.a).json()["id"]
    # The body is checked before the job, as FastAPI checks a declared body: the
    # answer is the same for a job without a model yet, another team's and none.
    for headers, path_id in ((api.a, job_id), (api.b, job_id), (api.a, 999_999)):
        response = api.client.post(f"/api/v1/jobs/{path_id}/predict", json=body, headers=headers)
        assert response.status_code == 422, response.text
        [detail] = response.json()["detail"]
        assert detail["loc"] == loc and detail["type"] == "value_error"
        assert words in detail["msg"] and detail["msg"].startswith(f"{loc[-1]}: ")
    # a good body still reaches the job: it has no model yet
    good = api.client.post(f"/api/v1/jobs/{job_id}/predict", json={"inputs": [1]}, headers=api.a)
    assert good.status_code == 404 and "no model yet" in good.json()["detail"]


def _unresolved_refs(document: Any) -> list[str]:
    """Each ``$ref`` (and discriminator mapping) in ``document`` that names nothing in it."""

    def target(ref: str) -> bool:
        if not ref.startswith("#/"):
            return False
        node = document
        for part in ref[2:].split("/"):
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(node, dict) or part not in node:
                return False
            node = node[part]
        return True

    refs: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                refs.append(node["$ref"])
            mapping = node.get("discriminator", {}).get("mapping", {})
            refs.extend(v for v in mapping.values() if isinstance(v, str))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(document)
    assert refs, "the document has no references at all"
    return [ref for ref in refs if not target(ref)]


def test_openapi_declares_the_json_bodies_and_every_ref_resolves(api: Api) -> None:
    document = api.client.get("/openapi.json").json()
    paths = document["paths"]

    submit = paths["/api/v1/jobs"]["post"]["requestBody"]
    assert submit["required"] is True and list(submit["content"]) == ["application/json"]
    spec = submit["content"]["application/json"]["schema"]
    assert spec["type"] == "object"
    assert {"name", "model", "dataset", "optimizer", "training", "resources"} <= set(
        spec["properties"]
    )
    assert set(spec["required"]) == {"name", "dataset", "model", "optimizer"}
    layers = spec["properties"]["model"]["properties"]["layers"]["items"]
    dense = next(v for v in layers["oneOf"] if v["properties"]["type"].get("const") == "dense")
    assert dense["properties"]["units"]["minimum"] == 1 and "units" in dense["required"]
    assert layers["discriminator"]["propertyName"] == "type"

    predict = paths["/api/v1/jobs/{job_id}/predict"]["post"]["requestBody"]
    assert predict["required"] is True and list(predict["content"]) == ["application/json"]
    inputs = predict["content"]["application/json"]["schema"]
    assert inputs["required"] == ["inputs"]
    assert inputs["properties"]["inputs"]["type"] == "array"
    assert inputs["properties"]["max_new_tokens"]["minimum"] == 0

    assert _unresolved_refs(document) == []


ROUTES = [
    ("post", "/api/v1/jobs"),
    ("get", "/api/v1/jobs"),
    ("get", "/api/v1/jobs/1"),
    ("post", "/api/v1/jobs/1/cancel"),
    ("get", "/api/v1/jobs/1/metrics"),
    ("get", "/api/v1/jobs/1/events"),
    ("get", "/api/v1/jobs/1/checkpoints"),
    ("get", "/api/v1/jobs/1/checkpoints/1"),
    ("get", "/api/v1/jobs/1/model"),
    ("post", "/api/v1/jobs/1/predict"),
    ("post", "/api/v1/datasets?name=x&format=npz"),
    ("get", "/api/v1/datasets"),
    ("get", "/api/v1/datasets/digits"),
    ("get", "/metrics"),
]


@pytest.mark.parametrize(("method", "path"), ROUTES)
def test_every_route_needs_a_token(api: Api, method: str, path: str) -> None:
    missing = api.client.request(method, path)
    wrong = api.client.request(method, path, headers={"Authorization": "Bearer tq_wrong"})
    assert missing.status_code == 401 and wrong.status_code == 401
    assert missing.headers["WWW-Authenticate"] == "Bearer"


def test_health_needs_no_token(api: Api) -> None:
    assert api.client.get("/healthz").json() == {"status": "ok"}
    ready = api.client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"]["database"] == "ok"


@pytest.mark.parametrize(
    ("method", "suffix"),
    [
        ("get", ""),
        ("post", "/cancel"),
        ("get", "/metrics"),
        ("get", "/checkpoints"),
        ("get", "/checkpoints/1"),
        ("get", "/model"),
        ("get", "/events"),
    ],
)
def test_another_teams_job_is_not_found(api: Api, method: str, suffix: str) -> None:
    job = api.client.post("/api/v1/jobs", json=_job(), headers=api.a).json()
    response = api.client.request(method, f"/api/v1/jobs/{job['id']}{suffix}", headers=api.b)
    assert response.status_code == 404
    assert api.client.get("/api/v1/jobs", headers=api.b).json()["count"] == 0
    with api.context.session_factory() as session:
        assert session.get(Job, job["id"]).status == JobStatus.queued


def test_prometheus_metrics(api: Api) -> None:
    api.client.post("/api/v1/jobs", json=_job(), headers=api.a)
    text = api.client.get("/metrics", headers=api.a).text
    assert 'trainq_jobs{status="queued"} 1.0' in text
    assert "trainq_http_request_duration_seconds_bucket" in text


def test_prometheus_queue_wait_and_run_time_are_means_over_the_jobs(api: Api) -> None:
    ids = [api.client.post("/api/v1/jobs", json=_job(), headers=api.a).json()["id"] for _ in "abc"]
    start = utcnow() - timedelta(hours=1)
    at = {seconds: start + timedelta(seconds=seconds) for seconds in (0, 10, 30, 70.5)}
    with api.context.session_factory() as session:
        session.execute(update(Job).values(created_at=at[0]))
        finished = session.get(Job, ids[0])
        finished.status, finished.started_at, finished.finished_at = (
            JobStatus.succeeded,
            at[10],
            at[70.5],
        )
        running = session.get(Job, ids[1])
        running.status, running.started_at = JobStatus.running, at[30]
        session.commit()
    text = api.client.get("/metrics", headers=api.a).text
    scraped = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in text.splitlines()
        if line.startswith("trainq_") and "{" not in line
    }
    assert scraped["trainq_queue_wait_seconds_avg"] == pytest.approx(20.0, abs=1e-3)  # 10, 30
    assert scraped["trainq_job_duration_seconds_avg"] == pytest.approx(60.5, abs=1e-3)
    assert 3600 <= scraped["trainq_queue_oldest_seconds"] < 3600 + 60  # ids[2], still queued


def test_home_page_points_to_the_api(api: Api) -> None:
    page = api.client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "/api/v1" in page.text and "/docs" in page.text
