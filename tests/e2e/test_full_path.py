"""The whole path over HTTP: submit, queue, Ray workers, metrics, model, predict."""

from __future__ import annotations

import io
import time

import numpy as np

from core import load_dataset
from tests.e2e.conftest import Service
from tests.service.factories import sentiment_classifier
from tests.service.test_datasets_api import _npz

JOB_TIMEOUT_S = 300.0

DIGITS_CNN = {
    "name": "digits-cnn",
    "dataset": {"name": "digits"},
    "model": {
        "layers": [
            {"type": "conv2d", "filters": 16, "kernel_size": 3, "padding": 1},
            {"type": "relu"},
            {"type": "conv2d", "filters": 32, "kernel_size": 3, "padding": 1},
            {"type": "relu"},
            {"type": "maxpool2d", "pool_size": 2},
            {"type": "flatten"},
            {"type": "dense", "units": 64},
            {"type": "relu"},
            {"type": "dense", "units": 10},
        ],
        "loss": "softmax_cross_entropy",
    },
    "optimizer": {"type": "adam", "lr": 0.002},
    "training": {
        "epochs": 15,
        "batch_size": 32,
        "validation_split": 0.1,
        "seed": 0,
        "checkpoint_every_epochs": 5,
        "log_every_steps": 20,
    },
    "resources": {"workers": 2, "device": "cpu"},
}


def wait_for(service: Service, job_id: int, statuses: tuple[str, ...]) -> dict:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while True:
        job = service.http.get(f"/api/v1/jobs/{job_id}").json()
        if job["status"] in statuses:
            return job
        assert time.monotonic() < deadline, f"job {job_id} still {job['status']}"
        time.sleep(0.5)


def test_digits_cnn_on_two_ray_workers_over_http(service: Service, dispatchers) -> None:  # noqa: ANN001
    dispatchers(1)
    created = service.http.post("/api/v1/jobs", json=DIGITS_CNN)
    assert created.status_code == 201, created.text
    job_id = created.json()["id"]
    job = wait_for(service, job_id, ("succeeded", "failed", "cancelled"))
    assert job["status"] == "succeeded", job["error"]
    assert job["final_metrics"]["val_accuracy"] >= 0.97
    assert job["final_metrics"]["test_accuracy"] >= 0.97
    assert [a["status"] for a in job["attempt_history"]] == ["succeeded"]
    assert [(e["attempt"], e["kind"], e["message"]) for e in job["run_events"]] == [
        (1, "group_started", "2 workers on 1 node(s)")
    ]

    series = service.http.get(f"/api/v1/jobs/{job_id}/metrics").json()["series"]
    assert series["epoch"]["values"] == [float(e) for e in range(1, 16)]
    assert max(series["val_accuracy"]["values"]) >= 0.97
    for name in (
        "train_loss",
        "allreduce_time_s",
        "samples_per_s",
        "grad_norm/0.conv2d",
        "update_ratio/8.dense",
    ):
        assert len(series[name]["values"]) == 15, name
    assert series["loss"]["steps"][0] == 20

    checkpoints = service.http.get(f"/api/v1/jobs/{job_id}/checkpoints").json()["data"]
    assert [c["epoch"] for c in checkpoints] == [5, 10, 15]
    middle = service.http.get(f"/api/v1/jobs/{job_id}/checkpoints/10")
    assert middle.status_code == 200 and middle.headers["ETag"] == f'"{checkpoints[1]["sha256"]}"'
    assert len(middle.content) == checkpoints[1]["size_bytes"]
    with np.load(io.BytesIO(middle.content), allow_pickle=False) as state:
        assert state["trainer/epoch"] == 10 and state["model/0.W"].shape == (16, 1, 3, 3)
    missing = service.http.get(f"/api/v1/jobs/{job_id}/checkpoints/7")
    assert (missing.status_code, missing.json()) == (
        404,
        {"detail": f"job {job_id} has no checkpoint of epoch 7"},
    )
    model = service.http.get(f"/api/v1/jobs/{job_id}/model")
    with np.load(io.BytesIO(model.content), allow_pickle=False) as state:
        assert state["model/0.W"].shape == (16, 1, 3, 3)

    digits = load_dataset("digits")
    answer = service.http.post(
        f"/api/v1/jobs/{job_id}/predict", json={"inputs": digits.X_test[:50].tolist()}
    )
    assert answer.status_code == 200, answer.text
    predicted = np.asarray(answer.json()["predictions"])
    assert (predicted == digits.y_test[:50]).mean() >= 0.9
    ready = service.http.get("/readyz").json()
    assert ready["checks"] == {"database": "ok", "schema": "ok", "ray": "ok"}


def test_text_classifier_on_ray_workers_answers_texts(service: Service, dispatchers) -> None:  # noqa: ANN001
    dispatchers(1)
    spec = sentiment_classifier(epochs=4, workers=2)
    job_id = service.http.post("/api/v1/jobs", json=spec).json()["id"]
    job = wait_for(service, job_id, ("succeeded", "failed", "cancelled"))
    assert job["status"] == "succeeded", job["error"]
    assert job["final_metrics"]["test_accuracy"] > 0.8
    model = service.http.get(f"/api/v1/jobs/{job_id}/model")
    with np.load(io.BytesIO(model.content), allow_pickle=False) as state:
        assert "dataset/meta" in state.files  # the vocabulary travels with the weights
    answer = service.http.post(
        f"/api/v1/jobs/{job_id}/predict", json={"inputs": ["a lovely film", "a dull film"]}
    )
    assert answer.status_code == 200, answer.text
    assert len(answer.json()["predictions"]) == 2


def test_a_batch_that_diverges_is_rolled_back_and_the_job_says_so(
    service: Service,
    dispatchers,  # noqa: ANN001
) -> None:
    dispatchers(1)
    digits = load_dataset("digits")
    X = digits.X[:400].copy()
    X[123] = 3e38  # finite, but no loss or gradient of it is
    upload = service.http.post(
        "/api/v1/datasets",
        params={"name": "poisoned", "format": "npz"},
        content=_npz(X=X, y=digits.y[:400]),
    )
    assert upload.status_code == 201, upload.text
    spec = {
        **DIGITS_CNN,
        "name": "poisoned",
        "dataset": {"name": "poisoned"},
        "training": {"epochs": 1, "batch_size": 50, "validation_split": 0.0},
        "resources": {"workers": 1},
    }
    job_id = service.http.post("/api/v1/jobs", json=spec).json()["id"]
    job = wait_for(service, job_id, ("succeeded", "failed", "cancelled"))
    assert job["status"] == "succeeded", job["error"]
    events = job["run_events"]
    assert [e["kind"] for e in events] == ["group_started", "diverged", "restored"]
    assert events[1]["message"].startswith("non-finite loss or gradient at epoch 1, batch ")
    assert events[1]["message"].endswith("; rolling back and skipping the batch")
    assert events[2]["message"] == "rolled back to the checkpoint of epoch 0"
