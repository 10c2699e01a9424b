"""Reading what jobs produced: metric series, checkpoints, the model, predictions."""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from typing import Any

from sqlalchemy import BigInteger, Float, Select, cast, func, literal, select, text, true, union
from sqlalchemy.dialects.postgresql import array
from sqlalchemy.orm import Session

from service.models import Checkpoint, Job, JobStatus, Metric
from service.schemas import Progress

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
        tail = session.execute(
            select(Metric.step, Metric.value)
            .where(*in_series)
            .order_by(Metric.step.desc())
            .limit(1)
        ).one()
        first = (int(head[0][0]), float(head[0][1]))
        last = (int(tail[0]), float(tail[1]))
        series[name] = _downsampled(session, job.id, name, first, last, max_points)
    return dict(sorted(series.items()))


def _fetch(session: Session, where: list[Any]) -> Series:
    series: Series = defaultdict(list)
    query = select(Metric.name, Metric.step, Metric.value).where(*where)
    for name, step, value in session.execute(query.order_by(Metric.name, Metric.step)):
        series[name].append((step, value))
    return dict(series)


def _downsampled(
    session: Session,
    job_id: int,
    name: str,
    first: tuple[int, float],
    last: tuple[int, float],
    max_points: int,
) -> list[tuple[int, float]]:
    """The points of the series ``name`` from step ``first`` to ``last`` (both kept)
    that hold the minimum and the maximum of a bucket, the earliest one among equals.
    Buckets are ranges of ``ceil(steps / ((max_points - 2) // 2))`` steps from ``first``."""
    buckets = (max_points - 2) // 2
    if buckets == 0:
        return [first, last]
    width = -(-(last[0] - first[0] + 1) // buckets)
    of_series = (Metric.job_id == job_id, Metric.name == name)
    if session.get_bind().dialect.name == "sqlite":
        return _downsampled_sqlite(session, of_series, first[0], last[0], width)
    # PostgreSQL aggregates each bucket's range of the primary key on its own (a
    # plan that needs no statistics, and no sort or hash of the whole series): the
    # smallest (value, step) pair of a bucket is its minimum, the largest
    # (value, -step) pair its maximum. JIT compiling would cost more than the query.
    session.execute(text("SET LOCAL jit = off"))
    count = -(-(last[0] - first[0] + 1) // width)
    bucket = func.generate_series(0, count - 1).table_valued("index").render_derived()
    start = literal(first[0], BigInteger) + bucket.c.index * width
    extremes = (
        select(
            func.min(array([Metric.value, cast(Metric.step, Float)])).label("low"),
            func.max(array([Metric.value, cast(-Metric.step, Float)])).label("high"),
        )
        .where(*of_series, Metric.step >= start, Metric.step < start + width)
        .lateral("extremes")
    )
    rows = session.execute(
        select(extremes.c.low, extremes.c.high).select_from(bucket.join(extremes, true()))
    )
    points = {first, last}
    for low, high in rows:
        if low is not None:  # an empty bucket
            points.add((int(low[1]), float(low[0])))
            points.add((-int(high[1]), float(high[0])))
    return sorted(points)


def _downsampled_sqlite(
    session: Session, of_series: tuple[Any, ...], first: int, last: int, width: int
) -> list[tuple[int, float]]:
    # Each bucket is a range of the primary key: SQLite reads it twice, once for the
    # row that holds its MIN() and once for the MAX() (a bare column takes the value
    # of that row, of the first such row among equals), with no sort at all.
    buckets = select(literal(first, BigInteger).label("start")).cte("buckets", recursive=True)
    buckets = buckets.union_all(
        select((buckets.c.start + width).label("start")).where(buckets.c.start + width <= last)
    )
    in_bucket = (
        *of_series,
        Metric.step >= buckets.c.start,
        Metric.step < buckets.c.start + width,
    )

    def each_bucket(aggregate: Any) -> Select[Any]:
        holder = select(Metric.step, aggregate(Metric.value)).where(*in_bucket)
        holder_row = holder.correlate(buckets).subquery()
        return select(select(holder_row.c.step).scalar_subquery()).select_from(buckets)

    steps = union(
        each_bucket(func.min),
        each_bucket(func.max),
        select(literal(first, BigInteger)),
        select(literal(last, BigInteger)),
    ).cte("kept")
    rows = session.execute(
        select(Metric.step, Metric.value)
        .where(*of_series, Metric.step.in_(select(steps.c[0])))
        .order_by(Metric.step)
    )
    return [(int(step), float(value)) for step, value in rows]


def progress_of(*, session: Session, jobs: list[Job]) -> dict[int, Progress]:
    """Each job's epochs done of its spec's, and a running job's time left, from its
    ``epoch`` and ``epoch_time_s`` series, in one query for all of them."""
    done: dict[int, int] = {}
    mean_epoch_s: dict[int, float] = {}
    if jobs:
        rows = session.execute(
            select(Metric.job_id, Metric.name, func.max(Metric.value), func.avg(Metric.value))
            .where(
                Metric.job_id.in_([job.id for job in jobs]),
                Metric.name.in_(("epoch", "epoch_time_s")),
            )
            .group_by(Metric.job_id, Metric.name)
        )
        for job_id, name, highest, mean in rows:
            if name == "epoch":
                done[job_id] = int(highest)
            else:
                mean_epoch_s[job_id] = float(mean)
    progress = {}
    for job in jobs:
        epochs = int(job.spec["training"]["epochs"])
        epochs_done = done.get(job.id, 0)
        eta = None
        if job.status == JobStatus.running and job.id in mean_epoch_s:
            eta = mean_epoch_s[job.id] * max(epochs - epochs_done, 0)
        progress[job.id] = Progress(epochs_done=epochs_done, epochs=epochs, eta_s=eta)
    return progress


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
