"""A dispatcher process killed mid-job: another one takes the job over and finishes it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from sqlalchemy import func, select

from service.context import ServiceContext
from service.dispatcher import Dispatcher
from service.models import Attempt, AttemptStatus, Checkpoint, Job, JobStatus, Metric
from tests.conftest import ROOT
from tests.service.conftest import Api
from tests.service.test_jobs_api import _job

LEASE_S = 2.0
EPOCHS = 40
DISPATCHER_SCRIPT = """
from service.context import ServiceContext
from service.dispatcher import Dispatcher
from service.settings import Settings
Dispatcher(ServiceContext.from_settings(Settings()), owner="doomed").run_once()
"""


def _count(context: ServiceContext, model: type, **where: object) -> int:
    with context.session_factory() as session:
        query = select(func.count()).select_from(model)
        for column, value in where.items():
            query = query.where(getattr(model, column) == value)
        return session.scalar(query) or 0


def test_killed_dispatcher_job_finishes_under_another(api: Api, database_url: str) -> None:
    context = api.context
    context.settings.lease_s = LEASE_S
    context.settings.heartbeat_s = 0.5
    spec = _job(training={"epochs": EPOCHS, "batch_size": 16, "checkpoint_every_epochs": 1})
    job_id = api.client.post("/api/v1/jobs", json=spec, headers=api.a).json()["id"]
    env = os.environ | {
        "TRAINQ_DATABASE_URL": database_url,
        "TRAINQ_ARTIFACT_DIR": str(context.settings.resolved_artifact_dir()),
        "TRAINQ_LEASE_S": str(LEASE_S),
        "TRAINQ_HEARTBEAT_S": "0.5",
        "PYTHONPATH": str(ROOT),
    }
    doomed = subprocess.Popen([sys.executable, "-c", DISPATCHER_SCRIPT], env=env)
    try:
        deadline = time.monotonic() + 120
        while _count(context, Checkpoint, job_id=job_id) < 2:
            assert doomed.poll() is None, "the first dispatcher ended before it was killed"
            assert time.monotonic() < deadline, "no checkpoint from the first dispatcher"
            time.sleep(0.05)
        doomed.send_signal(signal.SIGKILL)
    finally:
        doomed.wait(timeout=30)
    epochs_before = _count(context, Metric, job_id=job_id, name="epoch")
    assert 2 <= epochs_before < EPOCHS

    survivor = Dispatcher(context, owner="survivor")
    deadline = time.monotonic() + LEASE_S + 30
    while not survivor.run_once():  # nothing claimable until the dead lease expires
        assert time.monotonic() < deadline
        time.sleep(0.2)

    with context.session_factory() as session:
        job = session.get(Job, job_id)
        assert job.status == JobStatus.succeeded, job.error
        attempts = session.execute(
            select(Attempt.number, Attempt.dispatcher, Attempt.status).order_by(Attempt.number)
        ).all()
        epochs = session.scalars(
            select(Metric.value)
            .where(Metric.job_id == job_id, Metric.name == "epoch")
            .order_by(Metric.step)
        ).all()
        second_attempt_epochs = session.scalar(
            select(func.count())
            .select_from(Metric)
            .where(Metric.job_id == job_id, Metric.name == "epoch", Metric.attempt == 2)
        )
    assert attempts == [
        (1, "doomed", AttemptStatus.lost),
        (2, "survivor", AttemptStatus.succeeded),
    ]
    # exactly one row per epoch, and the survivor resumed instead of starting over
    assert epochs == [float(e) for e in range(1, EPOCHS + 1)]
    assert second_attempt_epochs <= EPOCHS - 2
