"""The dispatcher's write path with the in-process runner (the Ray path is in tests/e2e),
and what it keeps of an error raised in a Ray worker."""

from __future__ import annotations

import copy
import io
import threading
import time

import numpy as np
import pytest
from sqlalchemy import select

from core import load_dataset, parse_job_spec
from service.dispatcher import (
    MAX_ERROR_CHARS,
    Dispatcher,
    RunCallbacks,
    RunOutcome,
    attempt_error,
    local_runner,
    ray_runner,
    will_repeat,
)
from service.models import Attempt, AttemptStatus, Job, JobStatus, Team
from tests.service.conftest import Api
from tests.service.factories import sentiment_classifier
from tests.service.test_datasets_api import _npz
from tests.service.test_jobs_api import _job


def test_a_job_runs_and_everything_it_made_is_retrievable(api: Api) -> None:
    spec = _job(
        training={
            "epochs": 3,
            "batch_size": 32,
            "log_every_steps": 10,
            "checkpoint_every_epochs": 1,
        }
    )
    job = api.client.post("/api/v1/jobs", json=spec, headers=api.a).json()
    dispatcher = Dispatcher(api.context)
    assert dispatcher.run_once()
    assert not dispatcher.run_once()

    detail = api.client.get(f"/api/v1/jobs/{job['id']}", headers=api.a).json()
    assert detail["status"] == "succeeded", detail["error"]
    assert detail["has_model"] and detail["attempts"] == 1
    assert detail["final_metrics"]["test_accuracy"] > 0.85
    assert [a["status"] for a in detail["attempt_history"]] == ["succeeded"]

    metrics = api.client.get(f"/api/v1/jobs/{job['id']}/metrics", headers=api.a).json()["series"]
    assert len(metrics["train_loss"]["values"]) == 3
    assert metrics["epoch"]["values"] == [1.0, 2.0, 3.0]
    assert "grad_norm/1.dense" in metrics and "update_ratio/3.dense" in metrics
    assert metrics["loss"]["steps"][:2] == [10, 20]
    csv_text = api.client.get(
        f"/api/v1/jobs/{job['id']}/metrics",
        params={"format": "csv", "names": "val_accuracy"},
        headers=api.a,
    ).text
    assert csv_text.splitlines()[0] == "name,step,value" and len(csv_text.splitlines()) == 4

    checkpoints = api.client.get(f"/api/v1/jobs/{job['id']}/checkpoints", headers=api.a).json()
    assert [c["epoch"] for c in checkpoints["data"]] == [1, 2, 3]

    model = api.client.get(f"/api/v1/jobs/{job['id']}/model", headers=api.a)
    assert model.status_code == 200
    with np.load(io.BytesIO(model.content), allow_pickle=False) as state:
        assert state["model/1.W"].shape == (64, 32)

    digits = load_dataset("digits")
    inputs = digits.X_test[:20]
    answer = api.client.post(
        f"/api/v1/jobs/{job['id']}/predict", json={"inputs": inputs.tolist()}, headers=api.a
    )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert np.asarray(body["outputs"]).shape == (20, 10)
    predicted = np.asarray(body["predictions"])
    assert (predicted == digits.y_test[:20]).mean() >= 0.8
    wrong_shape = api.client.post(
        f"/api/v1/jobs/{job['id']}/predict", json={"inputs": [[1.0, 2.0]]}, headers=api.a
    )
    assert wrong_shape.status_code == 422
    assert wrong_shape.json()["detail"][0]["loc"] == ["body", "inputs"]


def test_a_failing_job_is_retried_then_fails_with_each_error(api: Api) -> None:
    job = api.client.post("/api/v1/jobs", json=_job(max_retries=1), headers=api.a).json()
    calls = []

    def broken_runner(**kwargs: object) -> None:
        calls.append(kwargs)
        raise RuntimeError(f"worker exploded {len(calls)}")

    api.context.settings.retry_backoff_s = 0.0
    dispatcher = Dispatcher(api.context, runner=broken_runner)
    assert dispatcher.run_once() and dispatcher.run_once()
    assert not dispatcher.run_once()
    with api.context.session_factory() as session:
        row = session.get(Job, job["id"])
        assert row.status == JobStatus.failed and row.attempts == 2
        attempts = session.execute(
            select(Attempt.status, Attempt.error).order_by(Attempt.number)
        ).all()
    assert attempts == [
        (AttemptStatus.failed, "RuntimeError: worker exploded 1"),
        (AttemptStatus.failed, "RuntimeError: worker exploded 2"),
    ]


def test_text_models_answer_texts(api: Api) -> None:
    classifier = sentiment_classifier(epochs=3)
    corpus = ("the cat sat on the mat. the dog sat on the log.\n" * 80).encode()
    upload = api.client.post(
        "/api/v1/datasets",
        params={"name": "mats", "format": "txt"},
        content=corpus,
        headers=api.a,
    )
    assert upload.status_code == 201, upload.text
    vocab = upload.json()["num_classes"]
    language_model = {
        "name": "mats-lm",
        "dataset": {"name": "mats"},
        "model": {
            "layers": [
                {"type": "embedding", "vocab_size": vocab, "dim": 16},
                {"type": "positional_embedding", "max_len": 64},
                {"type": "transformer_block", "heads": 2},
                {"type": "dense", "units": vocab},
            ],
            "loss": "softmax_cross_entropy",
        },
        "optimizer": {"type": "adam", "lr": 0.01},
        "training": {"epochs": 2, "batch_size": 8},
    }
    ids = []
    for spec in (classifier, language_model):
        created = api.client.post("/api/v1/jobs", json=spec, headers=api.a)
        assert created.status_code == 201, created.text
        ids.append(created.json()["id"])
    dispatcher = Dispatcher(api.context)
    assert dispatcher.run_once() and dispatcher.run_once()

    answer = api.client.post(
        f"/api/v1/jobs/{ids[0]}/predict",
        json={"inputs": ["what a wonderful day", "this is awful"]},
        headers=api.a,
    )
    assert answer.status_code == 200, answer.text
    assert np.asarray(answer.json()["outputs"]).shape == (2, 2)
    assert set(answer.json()["predictions"]) <= {0, 1}
    numbers = api.client.post(
        f"/api/v1/jobs/{ids[0]}/predict", json={"inputs": [[1, 2, 3]]}, headers=api.a
    )
    assert numbers.status_code == 422 and "strings" in numbers.json()["detail"][0]["msg"]

    continued = api.client.post(
        f"/api/v1/jobs/{ids[1]}/predict",
        json={"inputs": ["the cat sat on the "], "max_new_tokens": 8},
        headers=api.a,
    )
    assert continued.status_code == 200, continued.text
    body = continued.json()
    assert np.asarray(body["outputs"]).shape == (1, vocab)
    assert isinstance(body["predictions"][0], str) and len(body["predictions"][0]) == 8, body


def test_the_test_split_metrics_are_series_with_one_point_at_the_last_step(api: Api) -> None:
    spec = _job(training={"epochs": 2, "batch_size": 128, "log_every_steps": 5})
    job = api.client.post("/api/v1/jobs", json=spec, headers=api.a).json()
    assert Dispatcher(api.context).run_once()

    detail = api.client.get(f"/api/v1/jobs/{job['id']}", headers=api.a).json()
    assert detail["status"] == "succeeded", detail["error"]
    url = f"/api/v1/jobs/{job['id']}/metrics"
    series = api.client.get(url, params={"names": "test_accuracy,test_loss,epoch"}, headers=api.a)
    series = series.json()["series"]
    last_step = series["epoch"]["steps"][-1]
    for name in ("test_accuracy", "test_loss"):
        assert series[name] == {"steps": [last_step], "values": [detail["final_metrics"][name]]}


def _queue_unchecked(api: Api, spec: dict, *, max_retries: int, dataset: str = "digits") -> int:
    """A queued job as the dispatcher finds it, without the checks of a submission."""
    with api.context.session_factory() as session:
        team = session.scalars(select(Team).where(Team.name == "team-a")).one()
        job = Job(
            team_id=team.id,
            name=spec["name"],
            status=JobStatus.queued,
            spec=spec,
            dataset_name=dataset,
            dataset_version=1,
            max_retries=max_retries,
        )
        session.add(job)
        session.commit()
        return job.id


@pytest.mark.usefixtures("ray_session")
@pytest.mark.usefixtures("ray_session")
def test_an_error_raised_in_a_worker_is_stored_as_its_type_and_message() -> None:
    # Digits has 10 classes: the workers refuse to build a model of 5 outputs.
    spec = copy.deepcopy(_job())
    spec["model"]["layers"][-1]["units"] = 5
    callbacks = RunCallbacks(
        on_epoch=lambda *_: None,
        on_step=lambda *_: None,
        on_checkpoint=lambda *_: None,
        on_event=lambda *_: None,
        should_cancel=lambda: False,
    )
    with pytest.raises(Exception) as raised:  # noqa: B017 - whatever Ray wraps it in
        ray_runner(
            job=parse_job_spec(spec),
            dataset=load_dataset("digits"),
            resume=None,
            callbacks=callbacks,
        )
    error = attempt_error(raised.value)
    assert error == (
        "SpecError: model.loss: the dataset has 10 classes but the last layer gives 5 outputs"
    )
    assert will_repeat(raised.value)


def test_a_spec_that_does_not_fit_its_data_fails_at_once_before_it_runs(api: Api) -> None:
    """A job queued without a submission's checks (queued before they existed, or its
    data unreadable then) is checked again with its data: a retry would fail alike."""
    text_model = sentiment_classifier(epochs=1)
    text_model["model"]["layers"][0]["vocab_size"] = 10  # tiny_sentiment has 88 tokens
    job_id = _queue_unchecked(api, text_model, max_retries=2, dataset="tiny_sentiment")
    ran = []
    dispatcher = Dispatcher(api.context, runner=lambda **kwargs: ran.append(kwargs))
    assert dispatcher.run_once()
    assert not dispatcher.run_once() and ran == []
    with api.context.session_factory() as session:
        job = session.get(Job, job_id)
        assert job is not None and (job.status, job.attempts) == (JobStatus.failed, 1)
        error = session.scalars(select(Attempt.error).where(Attempt.job_id == job_id)).one()
    assert error == job.error
    assert error.startswith(
        "SpecError: model.layers[0].vocab_size (embedding): vocab_size 10 is smaller than "
        "the dataset's vocabulary of 88 tokens"
    )
    assert error.endswith(" (not retried)")


def test_a_regression_whose_outputs_do_not_fit_its_targets_fails_at_once(api: Api) -> None:
    X = np.random.default_rng(3).standard_normal((40, 5)).astype(np.float32)
    upload = api.client.post(
        "/api/v1/datasets",
        params={"name": "coords", "format": "npz"},
        content=_npz(X=X, y=X[:, :3]),  # float targets, 3 a sample
        headers=api.a,
    )
    assert upload.status_code == 201, upload.text
    spec = _job(dataset={"name": "coords"})
    spec["model"] = {"layers": [{"type": "dense", "units": 2}], "loss": "mse"}
    job_id = _queue_unchecked(api, spec, max_retries=2, dataset="coords")
    assert Dispatcher(api.context, runner=lambda **_: None).run_once()
    with api.context.session_factory() as session:
        job = session.get(Job, job_id)
        assert job is not None and (job.status, job.attempts) == (JobStatus.failed, 1)
    assert job.error == (
        "SpecError: model.loss: this dataset has targets (3,) per sample, so mse needs "
        "3 outputs per sample; the last layer gives (2,) (not retried)"
    )


class _Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("this error cannot be put into words")


def test_the_dispatcher_loop_survives_an_error_it_did_not_expect(api: Api) -> None:
    """An error escaping an attempt (here: one that cannot be written down) is logged,
    and the loop goes on to the next job instead of leaving the queue unserved."""
    calls = []

    def runner(**kwargs: object) -> RunOutcome:
        calls.append(kwargs)
        if len(calls) == 1:
            raise _Unprintable
        return local_runner(**kwargs)  # type: ignore[arg-type]

    first = _queue_unchecked(api, _job(name="first"), max_retries=0)
    second = _queue_unchecked(api, _job(name="second"), max_retries=0)
    stop = threading.Event()
    thread = threading.Thread(
        target=Dispatcher(api.context, runner=runner).run_forever, args=(stop,), daemon=True
    )
    thread.start()
    deadline = time.monotonic() + 60
    try:
        while _status(api, second) != JobStatus.succeeded:
            assert time.monotonic() < deadline, _status(api, second)
            assert thread.is_alive()
            time.sleep(0.05)
    finally:
        stop.set()
        thread.join(timeout=30)
    assert _status(api, first) == JobStatus.running  # its lease will expire; then reclaimed


def _status(api: Api, job_id: int) -> JobStatus:
    with api.context.session_factory() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job.status


@pytest.mark.usefixtures("ray_session")
def test_a_long_worker_error_keeps_its_type_and_its_end() -> None:
    import ray

    @ray.remote(num_cpus=0)
    def inner() -> None:
        raise ValueError("many lines\n" * 500 + "the line that says what went wrong")

    @ray.remote(num_cpus=0)
    def outer() -> None:
        ray.get(inner.remote())

    with pytest.raises(ray.exceptions.RayTaskError) as raised:
        ray.get(outer.remote())
    assert "\x1b" in str(raised.value)  # Ray's own message is coloured
    error = attempt_error(raised.value)
    assert error.startswith("ValueError: many lines\n")
    assert error.endswith("\nthe line that says what went wrong")
    assert len(error) <= MAX_ERROR_CHARS
    noted = attempt_error(raised.value, note=" (not retried)")
    assert noted.endswith("went wrong (not retried)") and len(noted) <= MAX_ERROR_CHARS
    assert "\x1b" not in error and "RayTaskError" not in error
