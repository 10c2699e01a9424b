from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select

from service import queue
from service.auth import create_token
from service.context import ServiceContext
from service.db import utcnow
from service.models import Attempt, AttemptStatus, Job, JobStatus, Metric, RunEvent
from tests.service.factories import add_jobs

LEASE_S = 30.0


def test_claim_order_is_priority_then_age(context: ServiceContext) -> None:
    ids = add_jobs(context, priorities=[0, 5, 0, 5, -1])
    claimed = [
        queue.claim_next_job(session_factory=context.session_factory, owner="d", lease_s=LEASE_S)
        for _ in range(6)
    ]
    assert [c.id if c else None for c in claimed] == [ids[1], ids[3], ids[0], ids[2], ids[4], None]
    assert all(c.attempt == 1 for c in claimed if c)


def test_claim_starts_an_attempt_with_a_lease(context: ServiceContext) -> None:
    (job_id,) = add_jobs(context, priorities=[0])
    claimed = queue.claim_next_job(
        session_factory=context.session_factory, owner="dispatcher-a", lease_s=LEASE_S
    )
    assert claimed is not None and claimed.id == job_id
    with context.session_factory() as session:
        job = session.get(Job, job_id)
        assert job.status == JobStatus.running
        assert job.lease_owner == "dispatcher-a"
        assert job.lease_expires_at > utcnow()
        attempt = session.scalars(select(Attempt).where(Attempt.job_id == job_id)).one()
        assert (attempt.number, attempt.status) == (1, AttemptStatus.running)


def test_expired_lease_is_reclaimed_and_stale_writes_are_fenced(context: ServiceContext) -> None:
    (job_id,) = add_jobs(context, priorities=[0])
    factory = context.session_factory
    first = queue.claim_next_job(session_factory=factory, owner="a", lease_s=LEASE_S)
    assert queue.write_metrics(
        session_factory=factory, job_id=job_id, attempt=1, rows=[("loss", 1, 2.0)]
    )
    # the lease is still live: nobody else can claim it
    assert queue.claim_next_job(session_factory=factory, owner="b", lease_s=LEASE_S) is None
    later = utcnow() + timedelta(seconds=LEASE_S + 1)
    second = queue.claim_next_job(session_factory=factory, owner="b", lease_s=LEASE_S, now=later)
    assert first is not None and second is not None
    assert (second.id, second.attempt) == (job_id, 2)

    stale = dict(session_factory=factory, job_id=job_id, attempt=1)
    assert not queue.write_metrics(**stale, rows=[("loss", 2, 9.0)])
    assert not queue.renew_lease(**stale, lease_s=LEASE_S).held
    assert not queue.finish_attempt(**stale, status=JobStatus.succeeded)
    assert queue.fail_attempt(**stale, error="boom", retry=queue.RetryStrategy()) is None
    event = dict(kind="restored", epoch=1, step=9, message="rolled back")
    assert not queue.record_event(**stale, **event)
    assert queue.record_event(session_factory=factory, job_id=job_id, attempt=2, **event)

    assert queue.renew_lease(session_factory=factory, job_id=job_id, attempt=2, lease_s=1).held
    # the new attempt resumes: its rewrite of step 1 does not duplicate the row
    assert queue.write_metrics(
        session_factory=factory,
        job_id=job_id,
        attempt=2,
        rows=[("loss", 1, 7.0), ("loss", 2, 1.0)],
    )
    assert queue.finish_attempt(
        session_factory=factory, job_id=job_id, attempt=2, status=JobStatus.succeeded
    )
    with factory() as session:
        job = session.get(Job, job_id)
        assert job.status == JobStatus.succeeded
        rows = session.execute(
            select(Metric.step, Metric.value, Metric.attempt).order_by(Metric.step)
        ).all()
        assert rows == [(1, 2.0, 1), (2, 1.0, 2)]
        events = session.execute(select(RunEvent.attempt, RunEvent.kind, RunEvent.step)).all()
        assert events == [(2, "restored", 9)]
        attempts = session.execute(
            select(Attempt.number, Attempt.status).order_by(Attempt.number)
        ).all()
        assert attempts == [(1, AttemptStatus.lost), (2, AttemptStatus.succeeded)]


def test_failures_retry_with_backoff_then_fail(context: ServiceContext) -> None:
    (job_id,) = add_jobs(context, priorities=[0], max_retries=1)
    factory = context.session_factory
    retry = queue.RetryStrategy(base_s=60.0)
    claimed = queue.claim_next_job(session_factory=factory, owner="a", lease_s=LEASE_S)
    assert claimed is not None
    status = queue.fail_attempt(
        session_factory=factory, job_id=job_id, attempt=1, error="first", retry=retry
    )
    assert status == JobStatus.queued
    # backing off: not claimable now, claimable after the delay
    assert queue.claim_next_job(session_factory=factory, owner="a", lease_s=LEASE_S) is None
    later = utcnow() + timedelta(seconds=61)
    again = queue.claim_next_job(session_factory=factory, owner="a", lease_s=LEASE_S, now=later)
    assert again is not None and again.attempt == 2
    status = queue.fail_attempt(
        session_factory=factory, job_id=job_id, attempt=2, error="second", retry=retry
    )
    assert status == JobStatus.failed
    with factory() as session:
        job = session.get(Job, job_id)
        assert (job.status, job.error, job.attempts) == (JobStatus.failed, "second", 2)
        errors = session.scalars(select(Attempt.error).order_by(Attempt.number)).all()
        assert errors == ["first", "second"]


def test_retry_strategy_backs_off_exponentially_with_a_cap() -> None:
    retry = queue.RetryStrategy(base_s=2.0, max_s=10.0)
    assert [retry.delay_s(n) for n in (1, 2, 3, 4)] == [2.0, 4.0, 8.0, 10.0]


def test_cancel_queued_job_is_immediate_running_job_is_asked(context: ServiceContext) -> None:
    queued_id, running_id = add_jobs(context, priorities=[0, 9])
    factory = context.session_factory
    claimed = queue.claim_next_job(session_factory=factory, owner="a", lease_s=LEASE_S)
    assert claimed is not None and claimed.id == running_id
    with factory() as session:
        queue.cancel_job(session=session, job=session.get(Job, queued_id))
        queue.cancel_job(session=session, job=session.get(Job, running_id))
    with factory() as session:
        assert session.get(Job, queued_id).status == JobStatus.cancelled
        assert session.get(Job, running_id).status == JobStatus.running
    lease = queue.renew_lease(
        session_factory=factory, job_id=running_id, attempt=1, lease_s=LEASE_S
    )
    assert lease.held and lease.cancel_requested
    assert queue.claim_next_job(session_factory=factory, owner="b", lease_s=LEASE_S) is None


def test_a_cancel_asked_of_an_attempt_that_was_lost_ends_the_job(
    context: ServiceContext,
) -> None:
    """Its dispatcher died before it saw the request: the job is cancelled when the
    lease expires, not run again (nor failed, when it had no retries left)."""
    factory = context.session_factory
    for max_retries in (2, 0):
        (job_id,) = add_jobs(context, priorities=[0], max_retries=max_retries)
        assert queue.claim_next_job(session_factory=factory, owner="a", lease_s=LEASE_S)
        with factory() as session:
            queue.cancel_job(session=session, job=session.get(Job, job_id))
        later = utcnow() + timedelta(seconds=LEASE_S + 1)
        assert (
            queue.claim_next_job(session_factory=factory, owner="b", lease_s=LEASE_S, now=later)
            is None
        )
        with factory() as session:
            job = session.get(Job, job_id)
            assert (job.status, job.error, job.attempts) == (JobStatus.cancelled, "cancelled", 1)
            assert job.finished_at == later and job.lease_owner is None
            attempt = session.scalars(select(Attempt).where(Attempt.job_id == job_id)).one()
            assert (attempt.status, attempt.error) == (AttemptStatus.lost, "lease expired")


def test_tokens_are_stored_hashed(context: ServiceContext) -> None:
    with context.session_factory() as session:
        team, token = create_token(session=session, team_name="vision")
        from service.auth import team_for_token
        from service.models import ApiToken

        stored = session.scalars(select(ApiToken.token_hash)).all()
        assert token not in stored and len(stored) == 1
        assert team_for_token(session=session, token=token).id == team.id
        assert team_for_token(session=session, token=token + "x") is None


def test_a_metrics_batch_keeps_the_first_of_a_repeated_row(context: ServiceContext) -> None:
    (job_id,) = add_jobs(context, priorities=[0])
    factory = context.session_factory
    claimed = queue.claim_next_job(session_factory=factory, owner="d", lease_s=LEASE_S)
    assert claimed is not None
    rows = [("loss", 1, 3.0), ("acc", 1, 0.5), ("loss", 2, 2.0), ("loss", 1, 9.0)]
    assert queue.write_metrics(session_factory=factory, job_id=job_id, attempt=1, rows=rows)
    assert queue.write_metrics(session_factory=factory, job_id=job_id, attempt=1, rows=[])
    with factory() as session:
        stored = session.execute(
            select(Metric.name, Metric.step, Metric.value, Metric.attempt)
            .where(Metric.job_id == job_id)
            .order_by(Metric.name, Metric.step)
        ).all()
    assert [tuple(row) for row in stored] == [
        ("acc", 1, 0.5, 1),
        ("loss", 1, 3.0, 1),
        ("loss", 2, 2.0, 1),
    ]
