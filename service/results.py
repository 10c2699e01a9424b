"""Reading what jobs produced: metric series, checkpoints, the model, predictions."""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import distinct_on
from sqlalchemy.orm import Session

from service.models import Checkpoint, Job, Metric

MAX_POINTS_LIMIT = 100_000

Series = dict[str, list[tuple[int, float]]]


def read_series(
    *,
    session: Session,
    job: Job,
    names: list[str] | None = None,
    since_step: int | None = None,
    max_points: int | None = None,
) -> Series:
    """``name -> [(step, value), ...]`` in step order; each series downsampled to at
    most ``max_points`` points, keeping its first and last point and every bucket's
    minimum and maximum (computed in the database, so long series stay fast)."""
    where = [Metric.job_id == job.id]
    if names:
        where.append(Metric.name.in_(names))
    if since_step is not None:
        where.append(Metric.step > since_step)
    if max_points is None:
        return _fetch(session, where)
    wanted = names or list(
        session.scalars(select(Metric.name).where(*where).distinct().order_by(Metric.name))
    )
    series: Series = {}
    for name in wanted:
        in_series = [*where, Metric.name == name]
        # At most max_points + 1 rows through the primary key: a short series is done.
        head = session.execute(
            select(Metric.step, Metric.value)
            .where(*in_series)
            .order_by(Metric.step)
            .limit(max_points + 1)
        ).all()
        if len(head) <= max_points:
            if head:
                series[name] = [(int(step), float(value)) for step, value in head]
            continue
        last = session.scalar(select(func.max(Metric.step)).where(*in_series))
        assert last is not None  # the series has more than max_points rows
        series[name] = _downsampled(session, where, name, int(head[0][0]), int(last), max_points)
    return dict(sorted(series.items()))


def _fetch(session: Session, where: list[Any]) -> Series:
    series: Series = defaultdict(list)
    query = select(Metric.name, Metric.step, Metric.value).where(*where)
    for name, step, value in session.execute(query.order_by(Metric.name, Metric.step)):
        series[name].append((step, value))
    return dict(series)


def _downsampled(
    session: Session, where: list[Any], name: str, first: int, last: int, max_points: int
) -> list[tuple[int, float]]:
    buckets = max(1, (max_points - 2) // 2)
    span = max(last - first + 1, 1)
    in_series = [*where, Metric.name == name]
    bucket = (Metric.step - first) * buckets // span
    points: set[tuple[int, float]] = set()
    if session.get_bind().dialect.name == "sqlite":
        # SQLite gives the bare column of the row that holds a MIN() or MAX().
        for aggregate in (func.min, func.max):
            rows = session.execute(
                select(Metric.step, aggregate(Metric.value)).where(*in_series).group_by(bucket)
            )
            points.update((int(step), float(value)) for step, value in rows)
    else:
        labelled = select(Metric.step, Metric.value, bucket.label("bucket")).where(*in_series)
        inner = labelled.subquery()
        for order in (inner.c.value.asc(), inner.c.value.desc()):
            rows = session.execute(
                select(inner.c.step, inner.c.value)
                .ext(distinct_on(inner.c.bucket))
                .order_by(inner.c.bucket, order, inner.c.step)
            )
            points.update((int(step), float(value)) for step, value in rows)
    ends = session.execute(
        select(Metric.step, Metric.value).where(*in_series, Metric.step.in_([first, last]))
    )
    points.update((int(step), float(value)) for step, value in ends)
    return sorted(points)


def series_csv(series: Series) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["name", "step", "value"])
    for name, points in series.items():
        for step, value in points:
            writer.writerow([name, step, repr(value)])
    return out.getvalue()


def series_json(series: Series) -> dict[str, Any]:
    return {
        "series": {
            name: {"steps": [p[0] for p in points], "values": [p[1] for p in points]}
            for name, points in series.items()
        }
    }


def list_checkpoints(*, session: Session, job: Job) -> list[Checkpoint]:
    return list(
        session.scalars(
            select(Checkpoint).where(Checkpoint.job_id == job.id).order_by(Checkpoint.epoch)
        )
    )
