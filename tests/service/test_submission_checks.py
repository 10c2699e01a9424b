"""Specs that could only fail at run time, on every attempt, are refused at submission:
a 422 naming the field, and no job stored. What trains keeps being accepted."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
from sqlalchemy import func, select, update

from core.data import Dataset, load_dataset
from core.text import Tokenizer, text_dataset_from_csv
from service.datasets import register_builtins
from service.errors import Invalid
from service.jobs import SubmissionCache, create_job
from service.models import DatasetVersion, Job, Team
from tests.service.conftest import Api
from tests.service.factories import TRIVIAL_SPEC, sentiment_classifier
from tests.service.test_datasets_api import _npz

DIGITS_JOB: dict[str, Any] = TRIVIAL_SPEC | {
    "name": "digits-mlp",
    "optimizer": {"type": "adam", "lr": 0.01},
}


def _job(base: dict[str, Any] = DIGITS_JOB, **changes: Any) -> dict[str, Any]:
    return copy.deepcopy(base) | changes


def _head(units: int, loss: str, *, flatten: bool = True) -> dict[str, Any]:
    layers = [{"type": "flatten"}] if flatten else []
    return {"layers": [*layers, {"type": "dense", "units": units}], "loss": loss}


def _stored_jobs(api: Api) -> int:
    with api.context.session_factory() as session:
        return session.scalar(select(func.count()).select_from(Job)) or 0


def _refused(api: Api, spec: dict[str, Any], loc: list[Any], *words: str) -> None:
    """Submit ``spec``; it must be a 422 naming ``loc`` that stores nothing."""
    before = _stored_jobs(api)
    response = api.client.post("/api/v1/jobs", json=spec, headers=api.a)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert [d["loc"] for d in detail] == [loc]
    for word in words:
        assert word in detail[0]["msg"]
    assert _stored_jobs(api) == before


def _accepted(api: Api, spec: dict[str, Any]) -> None:
    response = api.client.post("/api/v1/jobs", json=spec, headers=api.a)
    assert response.status_code == 201, response.text


def _upload(api: Api, name: str, data: bytes, fmt: str = "npz") -> dict[str, Any]:
    response = api.client.post(
        "/api/v1/datasets", params={"name": name, "format": fmt}, content=data, headers=api.a
    )
    assert response.status_code == 201, response.text
    return dict(response.json())


def _vocab_size(dataset: Dataset) -> int:
    tokenizer = dataset.meta["tokenizer"]
    assert isinstance(tokenizer, dict)
    return Tokenizer.from_json(tokenizer).vocab_size


def _reviews() -> tuple[bytes, int]:
    """A labelled-text upload, and the vocabulary the run will build from it."""
    rows = ["text,label", *[f"review {i} was good,pos" for i in range(20)]]
    rows += [f"review {i} was bad,neg" for i in range(20)]
    data = "\n".join(rows).encode()
    return data, _vocab_size(text_dataset_from_csv(data))


# --- the loss and the labels --------------------------------------------------------------


@pytest.mark.parametrize(
    ("loss", "words"),
    [
        ("mse", ("1 output per sample", "softmax_cross_entropy")),
        ("binary_cross_entropy", ("10 classes: use softmax_cross_entropy",)),
    ],
)
def test_a_loss_that_does_not_fit_integer_labels_is_refused(
    api: Api, loss: str, words: tuple[str, ...]
) -> None:
    """digits has 10 classes: 10 outputs feed neither mse nor binary_cross_entropy."""
    _refused(api, _job(model=_head(10, loss)), ["body", "model", "loss"], *words)


def test_a_regression_dataset_takes_mse_or_binary_cross_entropy_per_target(api: Api) -> None:
    rng = np.random.default_rng(0)
    X = rng.standard_normal((40, 5)).astype(np.float32)
    _upload(api, "prices", _npz(X=X, y=X[:, :3].sum(axis=1)))  # float y (N,)
    _upload(api, "coords", _npz(X=X, y=X[:, :3]))  # float y (N, 3)
    prices = _job(dataset={"name": "prices"})
    coords = _job(dataset={"name": "coords"})

    _refused(
        api,
        _job(prices, model=_head(2, "softmax_cross_entropy", flatten=False)),
        ["body", "model", "loss"],
        "real numbers: use mse",
    )
    _refused(
        api,
        _job(coords, model=_head(2, "mse", flatten=False)),
        ["body", "model", "loss"],
        "targets (3,) per sample, so mse needs 3 outputs",
    )
    _accepted(api, _job(prices, model=_head(1, "mse", flatten=False)))
    _accepted(api, _job(coords, model=_head(3, "mse", flatten=False)))
    _accepted(api, _job(coords, model=_head(3, "binary_cross_entropy", flatten=False)))


def test_what_trains_today_is_still_accepted(api: Api) -> None:
    rng = np.random.default_rng(1)
    X = rng.standard_normal((40, 5)).astype(np.float32)
    _upload(api, "blobs", _npz(X=X, y=(X[:, 0] > 0).astype(np.int64)))  # 0/1 labels
    corpus = ("the cat sat on the mat. the dog sat on the log.\n" * 40).encode()
    vocab = _upload(api, "mats", corpus, fmt="txt")["num_classes"]
    language_model = {
        "name": "lm",
        "dataset": {"name": "mats"},
        "model": {
            "layers": [
                {"type": "embedding", "vocab_size": vocab, "dim": 8},
                {"type": "dense", "units": vocab},
            ],
            "loss": "softmax_cross_entropy",
        },
        "optimizer": {"type": "adam", "lr": 0.01},
    }

    _accepted(api, DIGITS_JOB)
    _accepted(api, _job(model=_head(1, "mse")))  # a class index regressed as a number
    blobs = _job(dataset={"name": "blobs"})
    _accepted(api, _job(blobs, model=_head(1, "binary_cross_entropy", flatten=False)))
    _accepted(api, _job(blobs, model=_head(2, "softmax_cross_entropy", flatten=False)))
    _accepted(api, language_model)
    _accepted(api, sentiment_classifier(epochs=1))
    assert _stored_jobs(api) == 6


# --- the embedding and the vocabulary ------------------------------------------------------


def _classifier(dataset: str, vocab_size: int) -> dict[str, Any]:
    spec = sentiment_classifier(epochs=1)
    spec["dataset"] = {"name": dataset}
    spec["model"]["layers"][0]["vocab_size"] = vocab_size
    return spec


def test_an_embedding_smaller_than_the_vocabulary_is_refused(api: Api) -> None:
    vocab = _vocab_size(load_dataset("tiny_sentiment"))
    loc = ["body", "model", "layers", 0, "vocab_size"]
    _refused(api, _classifier("tiny_sentiment", 10), loc, f"vocabulary of {vocab} tokens")
    _refused(api, _classifier("tiny_sentiment", vocab - 1), loc, f"at least {vocab}")
    _accepted(api, _classifier("tiny_sentiment", vocab))


def test_an_uploaded_text_dataset_vocabulary_is_checked_too(api: Api) -> None:
    data, vocab = _reviews()
    _upload(api, "reviews", data, fmt="csv")
    loc = ["body", "model", "layers", 0, "vocab_size"]
    _refused(api, _classifier("reviews", vocab - 1), loc, f"vocabulary of {vocab} tokens")
    _accepted(api, _classifier("reviews", vocab))


def test_a_language_model_embedding_is_checked_against_its_corpus(api: Api) -> None:
    corpus = load_dataset("tiny_corpus")
    vocab = int(corpus.num_classes or 0)
    spec = {
        "name": "lm",
        "dataset": {"name": "tiny_corpus"},
        "model": {
            "layers": [
                {"type": "embedding", "vocab_size": vocab - 1, "dim": 8},
                {"type": "dense", "units": vocab},
            ],
            "loss": "softmax_cross_entropy",
        },
        "optimizer": {"type": "adam", "lr": 0.01},
    }
    _refused(api, spec, ["body", "model", "layers", 0, "vocab_size"], f"at least {vocab}")


# --- where the checks read the targets ----------------------------------------------------


def test_an_upload_row_says_its_targets_and_vocabulary(api: Api) -> None:
    rng = np.random.default_rng(0)
    X = rng.standard_normal((40, 5)).astype(np.float32)
    coords = _upload(api, "coords", _npz(X=X, y=X[:, :3]))
    data, vocab = _reviews()
    reviews = _upload(api, "reviews", data, fmt="csv")
    corpus = _upload(api, "corpus", b"the cat sat on the mat. " * 40, fmt="txt")
    assert (coords["label_shape"], coords["vocab_size"]) == ([3], None)
    assert (reviews["label_shape"], reviews["vocab_size"]) == ([], vocab)
    assert (corpus["label_shape"], corpus["vocab_size"]) == (
        corpus["input_shape"],
        corpus["num_classes"],
    )
    with api.context.session_factory() as session:
        # the row alone is enough: a submission that cannot read the data checks it too
        team = session.scalars(select(Team).where(Team.name == "team-a")).one()
        for spec, field in (
            (_job(dataset={"name": "coords"}, model=_head(2, "mse", flatten=False)), "loss"),
            (_classifier("reviews", vocab - 1), "layers"),
        ):
            with pytest.raises(Invalid) as refused:
                create_job(
                    session=session,
                    team=team,
                    body=spec,
                    limits=api.context.limits,
                    cache=SubmissionCache(store=None),
                )
            assert refused.value.loc[:3] == ("body", "model", field)


def test_an_upload_stored_before_its_row_said_its_targets_is_read(api: Api) -> None:
    rng = np.random.default_rng(0)
    X = rng.standard_normal((40, 5)).astype(np.float32)
    _upload(api, "coords", _npz(X=X, y=X[:, :3]))
    data, vocab = _reviews()
    _upload(api, "reviews", data, fmt="csv")
    with api.context.session_factory() as session:  # as revision 0003 leaves older rows
        session.execute(update(DatasetVersion).values(label_shape=None, vocab_size=None))
        session.commit()
    _refused(
        api,
        _job(dataset={"name": "coords"}, model=_head(2, "mse", flatten=False)),
        ["body", "model", "loss"],
        "targets (3,) per sample, so mse needs 3 outputs",
    )
    loc = ["body", "model", "layers", 0, "vocab_size"]
    _refused(api, _classifier("reviews", vocab - 1), loc, f"vocabulary of {vocab} tokens")
    _accepted(api, _classifier("reviews", vocab))


def test_registering_the_built_ins_fills_in_their_targets(api: Api) -> None:
    with api.context.session_factory() as session:
        session.execute(update(DatasetVersion).values(label_shape=None, vocab_size=None))
        session.commit()
        register_builtins(session=session)
        rows = {
            row.name: (row.label_shape, row.vocab_size)
            for row in session.scalars(select(DatasetVersion))
        }
    assert rows["digits"] == ([], None)
    assert rows["tiny_sentiment"] == ([], _vocab_size(load_dataset("tiny_sentiment")))


# --- optimizer bounds -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["adam", "adamw"])
def test_adam_betas_of_one_or_more_are_refused(api: Api, kind: str) -> None:
    optimizer = {"type": kind, "lr": 0.001, "betas": [1.0, 2.0]}
    _refused(api, _job(optimizer=optimizer), ["body", "optimizer", "betas", 0], "less than 1")
    optimizer["betas"] = [0.9, 1.0]
    _refused(api, _job(optimizer=optimizer), ["body", "optimizer", "betas", 1], "less than 1")


# --- GPUs -----------------------------------------------------------------------------------


def test_a_gpu_job_on_a_cluster_without_gpus_is_refused(api: Api) -> None:
    api.context.cluster_gpus = 0
    gpu = _job(resources={"workers": 1, "device": "gpu"})
    _refused(api, gpu, ["body", "resources", "device"], "no GPU", 'use device "cpu"')
    _accepted(api, _job(resources={"workers": 1, "device": "cpu"}))


def test_more_gpu_workers_than_gpus_is_refused(api: Api) -> None:
    api.context.cluster_gpus = 2
    three = _job(resources={"workers": 3, "device": "gpu"})
    _refused(api, three, ["body", "resources", "workers"], "needs 3 but the cluster has 2")
    _accepted(api, _job(resources={"workers": 2, "device": "gpu"}))


def test_gpu_jobs_are_accepted_when_the_gpus_are_unknown(api: Api) -> None:
    assert api.context.cluster_gpus is None
    _accepted(api, _job(resources={"workers": 4, "device": "gpu"}))
