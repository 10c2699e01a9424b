"""Prometheus metrics: HTTP latency, jobs by status, queue wait and job duration."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import ColumnElement, func, select
from sqlalchemy.orm import Session, sessionmaker

from service.db import utcnow
from service.models import Job, JobStatus

SECONDS_PER_DAY = 86_400.0
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
            dialect = session.get_bind().dialect.name
            mean_wait, mean_run = session.execute(
                select(
                    func.avg(_seconds(Job.started_at, Job.created_at, dialect)),
                    func.avg(_seconds(Job.finished_at, Job.started_at, dialect)),
                ).where(Job.started_at.is_not(None))
            ).one()
            first_queued = session.scalar(
                select(func.min(Job.created_at)).where(Job.status == JobStatus.queued)
            )
        for job_status in JobStatus:
            by_status.add_metric([job_status.value], float(counts.get(job_status, 0)))
        wait.add_metric([], float(mean_wait or 0.0))
        duration.add_metric([], float(mean_run or 0.0))
        oldest.add_metric([], (utcnow() - first_queued).total_seconds() if first_queued else 0.0)
        yield from (by_status, wait, duration, oldest)


def _seconds(later: Any, earlier: Any, dialect: str) -> ColumnElement[Any]:
    """``later - earlier`` in seconds, in SQL (NULL where either is): averaged there,
    so a scrape reads one row however many jobs have run."""
    if dialect == "postgresql":
        return func.extract("epoch", later - earlier)
    return (func.julianday(later) - func.julianday(earlier)) * SECONDS_PER_DAY


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
