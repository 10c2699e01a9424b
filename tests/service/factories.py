"""Rows for service tests."""

from __future__ import annotations

from service.auth import create_token
from service.context import ServiceContext
from service.models import Job, JobStatus

TRIVIAL_SPEC = {
    "name": "trivial",
    "dataset": {"name": "digits"},
    "model": {
        "layers": [{"type": "flatten"}, {"type": "dense", "units": 10}],
        "loss": "softmax_cross_entropy",
    },
    "optimizer": {"type": "sgd", "lr": 0.1},
    "training": {"epochs": 1},
}


def add_jobs(
    context: ServiceContext, *, priorities: list[int], max_retries: int = 2, team: str = "t"
) -> list[int]:
    """Queued jobs, in order of creation; returns their ids."""
    with context.session_factory() as session:
        team_row, _ = create_token(session=session, team_name=team)
        jobs = [
            Job(
                team_id=team_row.id,
                name=f"job-{i}",
                status=JobStatus.queued,
                spec=TRIVIAL_SPEC,
                dataset_name="digits",
                dataset_version=1,
                priority=priority,
                max_retries=max_retries,
            )
            for i, priority in enumerate(priorities)
        ]
        session.add_all(jobs)
        session.commit()
        return [job.id for job in jobs]


def sentiment_classifier(*, epochs: int, workers: int = 1) -> dict:
    """A word-level classifier of the shipped ``tiny_sentiment`` reviews."""
    return {
        "name": "moods",
        "dataset": {"name": "tiny_sentiment"},
        "model": {
            "layers": [
                {"type": "embedding", "vocab_size": 2000, "dim": 16},
                {"type": "mean_pool"},
                {"type": "dense", "units": 2},
            ],
            "loss": "softmax_cross_entropy",
        },
        "optimizer": {"type": "adam", "lr": 0.01},
        "training": {"epochs": epochs, "batch_size": 32},
        "resources": {"workers": workers},
    }
