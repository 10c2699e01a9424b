"""Reading what jobs produced: metric series, checkpoints, the model, predictions."""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from typing import Any

from sqlalchemy import select
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
    most ``max_points`` points, keeping every bucket's minimum and maximum."""
    query = select(Metric.name, Metric.step, Metric.value).where(Metric.job_id == job.id)
    if names:
        query = query.where(Metric.name.in_(names))
    if since_step is not None:
        query = query.where(Metric.step > since_step)
    series: Series = defaultdict(list)
    for name, step, value in session.execute(query.order_by(Metric.name, Metric.step)):
        series[name].append((step, value))
    if max_points is not None:
        return {name: downsample(points, max_points) for name, points in series.items()}
    return dict(series)


def downsample(points: list[tuple[int, float]], max_points: int) -> list[tuple[int, float]]:
    """At most ``max_points`` points: the first and last, and per bucket of the rest its
    minimum and maximum in step order, so spikes survive."""
    if len(points) <= max_points:
        return points
    if max_points < 4:
        return [points[0], points[-1]][:max_points]
    inner = points[1:-1]
    buckets = (max_points - 2) // 2
    size = len(inner) / buckets
    kept = [points[0]]
    for b in range(buckets):
        chunk = inner[int(b * size) : int((b + 1) * size)]
        if not chunk:
            continue
        low = min(chunk, key=lambda p: p[1])
        high = max(chunk, key=lambda p: p[1])
        kept.extend(sorted({low, high}))
    kept.append(points[-1])
    return kept


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
