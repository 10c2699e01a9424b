"""Prometheus metrics: HTTP latency, jobs by status, queue wait and job duration."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from service.db import utcnow
from service.models import Job, JobStatus

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class JobsCollector(Collector):
    """Read from the database at scrape time, so every API replica reports the same."""

    def __init__(self, session_factory: sessionmaker[Session]) -> None:
        self.session_factory = session_factory

    def collect(self) -> Iterator[Metric]:
        by_status = GaugeMetricFamily("trainq_jobs", "Jobs by status", labels=["status"])
        wait = GaugeMetricFamily(
            "trainq_queue_wait_seconds_avg", "Mean wait from submission to first claim"
        )
        duration = GaugeMetricFamily(
            "trainq_job_duration_seconds_avg", "Mean run time of finished jobs"
        )
        oldest = GaugeMetricFamily("trainq_queue_oldest_seconds", "Age of the oldest queued job")
        with self.session_factory() as session:
            counts = dict(
                session.execute(select(Job.status, func.count()).group_by(Job.status)).all()
            )
            started = session.execute(
                select(Job.created_at, Job.started_at, Job.finished_at).where(
                    Job.started_at.is_not(None)
                )
            ).all()
            first_queued = session.scalar(
                select(func.min(Job.created_at)).where(Job.status == JobStatus.queued)
            )
        for job_status in JobStatus:
            by_status.add_metric([job_status.value], float(counts.get(job_status, 0)))
        waits = [(s - c).total_seconds() for c, s, _ in started if s is not None]
        runs = [(f - s).total_seconds() for _, s, f in started if s is not None and f is not None]
        wait.add_metric([], sum(waits) / len(waits) if waits else 0.0)
        duration.add_metric([], sum(runs) / len(runs) if runs else 0.0)
        oldest.add_metric([], (utcnow() - first_queued).total_seconds() if first_queued else 0.0)
        yield from (by_status, wait, duration, oldest)


def make_registry(session_factory: sessionmaker[Session]) -> tuple[CollectorRegistry, Histogram]:
    registry = CollectorRegistry()
    registry.register(JobsCollector(session_factory))
    latency = Histogram(
        "trainq_http_request_duration_seconds",
        "HTTP request latency",
        ["method", "route", "status"],
        buckets=LATENCY_BUCKETS_S,
        registry=registry,
    )
    return registry, latency
