"""Cancelling a job that runs on Ray workers, or waits for them, stops it and releases them."""

from __future__ import annotations

import time

from tests.conftest import RAY_NUM_CPUS
from tests.e2e.conftest import Service
from tests.e2e.test_full_path import DIGITS_CNN, wait_for


def test_cancel_a_running_job(service: Service, dispatchers) -> None:  # noqa: ANN001
    import ray

    service.context.settings.heartbeat_s = 0.2
    dispatchers(1)
    spec = {**DIGITS_CNN, "name": "long", "training": {**DIGITS_CNN["training"], "epochs": 500}}
    job_id = service.http.post("/api/v1/jobs", json=spec).json()["id"]
    deadline = time.monotonic() + 120
    while True:
        series = service.http.get(f"/api/v1/jobs/{job_id}/metrics").json()["series"]
        if "epoch" in series:
            break
        assert time.monotonic() < deadline, "the job never finished an epoch"
        time.sleep(0.2)
    cancelled = service.http.post(f"/api/v1/jobs/{job_id}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["cancel_requested"]
    job = wait_for(service, job_id, ("cancelled", "failed", "succeeded"))
    assert job["status"] == "cancelled"
    assert [a["status"] for a in job["attempt_history"]] == ["cancelled"]
    assert [(e["kind"], e["message"]) for e in job["run_events"]] == [
        ("group_started", "2 workers on 1 node(s)"),
        ("cancelled", "cancelled by the caller"),
    ]
    epochs = service.http.get(f"/api/v1/jobs/{job_id}/metrics").json()["series"]["epoch"]
    assert len(epochs["values"]) < 500
    # every worker's CPUs go back to the cluster (actors killed, placement group removed)
    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"]:
        assert time.monotonic() < deadline, ray.available_resources()
        time.sleep(0.2)


def test_cancel_a_job_waiting_for_resources(service: Service, dispatchers) -> None:  # noqa: ANN001
    """A job the cluster cannot place (as on an autoscaling cluster not yet grown, where
    the API does not know the cluster's size) is cancelled within seconds, not after
    the workers' start-up timeout."""
    from ray.util.placement_group import placement_group_table

    def waiting_groups() -> list[str]:
        return [g["name"] for g in placement_group_table().values() if g["state"] == "PENDING"]

    service.context.settings.heartbeat_s = 0.2
    service.context.cluster_workers = None
    dispatchers(1)
    spec = {**DIGITS_CNN, "name": "unplaceable", "resources": {"workers": RAY_NUM_CPUS + 1}}
    created = service.http.post("/api/v1/jobs", json=spec)
    assert created.status_code == 201, created.text
    job_id = created.json()["id"]
    deadline = time.monotonic() + 60
    while not any(name.startswith("trainq-") for name in waiting_groups()):
        assert time.monotonic() < deadline, "the job's workers were never asked for"
        time.sleep(0.1)
    assert service.http.post(f"/api/v1/jobs/{job_id}/cancel").status_code == 200
    job = wait_for(service, job_id, ("cancelled", "failed", "succeeded"))
    assert job["status"] == "cancelled"
    # not the start-up timeout's failure (120 s on), which a cancel would then turn into
    # a cancelled job with a failed attempt: the wait itself ended
    assert [a["status"] for a in job["attempt_history"]] == ["cancelled"]
    assert [e["kind"] for e in job["run_events"]] == ["cancelled"]  # no group ever started
    assert not any(name.startswith("trainq-") for name in waiting_groups())
