"""Several dispatcher processes claiming from one queue: each job exactly once."""

from __future__ import annotations

import multiprocessing as mp
import multiprocessing.synchronize

from sqlalchemy import func, select

from service import queue
from service.context import ServiceContext
from service.db import make_engine, make_sessionmaker
from service.models import Attempt, Job, JobStatus
from tests.service.factories import add_jobs

JOBS = 500
DISPATCHERS = 4


def _claim_all(url: str, owner: str, start: mp.synchronize.Barrier, out: mp.Queue) -> None:
    engine = make_engine(url)
    factory = make_sessionmaker(engine)
    claimed = []
    start.wait(timeout=120)  # all claim at once, so they really contend
    while True:
        job = queue.claim_next_job(session_factory=factory, owner=owner, lease_s=600)
        if job is None:
            break
        claimed.append(job.id)
        queue.finish_attempt(
            session_factory=factory, job_id=job.id, attempt=job.attempt, status=JobStatus.succeeded
        )
    engine.dispose()
    out.put((owner, claimed))


def test_four_dispatcher_processes_claim_each_job_exactly_once(
    context: ServiceContext, database_url: str
) -> None:
    ids = add_jobs(context, priorities=[i % 3 for i in range(JOBS)])
    ctx = mp.get_context("spawn")
    out: mp.Queue = ctx.Queue()
    start = ctx.Barrier(DISPATCHERS)
    workers = [
        ctx.Process(target=_claim_all, args=(database_url, f"dispatcher-{i}", start, out))
        for i in range(DISPATCHERS)
    ]
    for worker in workers:
        worker.start()
    results = dict(out.get(timeout=240) for _ in workers)
    for worker in workers:
        worker.join(timeout=30)
        assert worker.exitcode == 0
    claimed = [job_id for ids_of_one in results.values() for job_id in ids_of_one]
    assert len(claimed) == JOBS
    assert sorted(claimed) == sorted(ids)
    assert sum(1 for ids_of_one in results.values() if ids_of_one) >= 2
    with context.session_factory() as session:
        assert session.scalar(select(func.count()).select_from(Attempt)) == JOBS
        statuses = session.scalars(select(Job.status).distinct()).all()
        assert statuses == [JobStatus.succeeded]
