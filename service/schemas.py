"""What the API returns (the job spec itself is core's ``JobSpec``)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field


def _in_utc(moment: datetime) -> datetime:
    """The database keeps UTC without a zone; the API says so (``...Z``)."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


#: A moment in UTC, written with its zone.
Moment = Annotated[datetime, AfterValidator(_in_utc)]


#: The ``id`` of an events stream's last event (the job's terminal status); after it,
#: a reconnection gets 204.
STREAM_END = "end"


class _Public(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class AttemptPublic(_Public):
    number: int
    status: str
    dispatcher: str
    error: str | None
    started_at: Moment
    finished_at: Moment | None


class RunEventPublic(_Public):
    attempt: int
    kind: str
    epoch: int
    step: int
    message: str
    created_at: Moment


class Progress(BaseModel):
    #: Epochs finished (the latest ``epoch`` metric), of the spec's ``epochs``.
    epochs_done: int
    epochs: int
    #: A running job's mean epoch time so far times the epochs left; None before its
    #: first epoch ends, and once it has ended.
    eta_s: float | None


class JobPublic(_Public):
    id: int
    name: str
    status: str
    spec: dict[str, Any]
    dataset_name: str
    dataset_version: int
    priority: int
    max_retries: int
    attempts: int
    cancel_requested: bool
    error: str | None
    final_metrics: dict[str, Any] | None
    created_at: Moment
    started_at: Moment | None
    finished_at: Moment | None
    progress: Progress


class JobDetail(JobPublic):
    attempt_history: list[AttemptPublic]
    #: What happened while it ran: workers started or failed, divergences rolled back.
    run_events: list[RunEventPublic]
    #: Queued jobs that will be claimed before this one (0 unless queued).
    jobs_ahead: int
    queue_wait_s: float | None
    run_time_s: float | None
    has_model: bool


class JobsPublic(BaseModel):
    data: list[JobPublic]
    count: int
    next_cursor: str | None


class DatasetPublic(_Public):
    name: str
    version: int
    kind: str
    builtin: bool
    input_shape: list[int]
    num_classes: int | None
    num_samples: int
    #: One sample's targets ([] a label or a number); null on an upload stored before
    #: the service kept it.
    label_shape: list[int] | None
    #: How many token ids a text dataset's inputs use (an embedding's least vocab_size).
    vocab_size: int | None
    created_at: Moment


class DatasetsPublic(BaseModel):
    data: list[DatasetPublic]
    count: int


class CheckpointPublic(_Public):
    epoch: int
    step: int
    attempt: int
    sha256: str
    size_bytes: int
    created_at: Moment


class CheckpointsPublic(BaseModel):
    data: list[CheckpointPublic]
    count: int


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    #: Rows shaped like the dataset's samples, or texts for a model trained on text.
    inputs: list[Any]
    #: For a language model: how many tokens to generate after each text (0: the next one).
    max_new_tokens: int = Field(default=0, ge=0, le=1024)
    temperature: float = Field(default=0.0, ge=0.0, le=10.0)


class PredictResponse(BaseModel):
    outputs: list[Any]
    predictions: list[Any]
