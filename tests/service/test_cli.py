"""``trainq train``, ``summary`` and ``db upgrade``, run as real processes."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import select

from core import DatasetUnavailable, load_dataset, summarize
from core.data import BUILTIN_DATASETS, load_digits
from service.auth import team_for_token
from service.context import ServiceContext
from service.models import DatasetVersion
from tests.factories import ROOT, example_job

TIMEOUT_S = 120


def trainq(*args: str | Path, **settings: str) -> subprocess.CompletedProcess[str]:
    """The command line in a process of its own; ``settings`` add to its environment."""
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", **settings}
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *map(str, args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )


def _write_job(tmp_path: Path, job: dict[str, Any]) -> Path:
    path = tmp_path / "job.json"
    path.write_text(json.dumps(job))
    return path


@pytest.fixture
def short_job() -> dict[str, Any]:
    job = example_job("digits_cnn")
    job["training"]["epochs"] = 2
    return job


def test_train_prints_summary_epochs_and_test_metrics_and_saves(
    tmp_path: Path, short_job: dict[str, Any]
) -> None:
    saved = tmp_path / "model.npz"
    result = trainq("train", _write_job(tmp_path, short_job), "--save", saved)
    assert result.returncode == 0, result.stderr

    summary = summarize(short_job["model"], (1, 8, 8), 10)
    assert str(summary) in result.stdout
    lines = result.stdout.splitlines()
    metrics = dict(line.split(" ") for line in lines if line.startswith("test_"))
    assert set(metrics) == {"test_loss", "test_accuracy"}
    assert 0.5 < float(metrics["test_accuracy"]) <= 1.0  # two epochs already learn digits
    assert f"saved {saved}" in lines[-1]

    # Not a terminal: one plain line per epoch on stderr.
    progress = [line for line in result.stderr.splitlines() if line.startswith("epoch ")]
    assert [line.split()[1] for line in progress] == ["1/2", "2/2"]
    assert all("val_accuracy" in line for line in progress)

    with np.load(io.BytesIO(saved.read_bytes()), allow_pickle=False) as archive:
        names = set(archive.files)
        assert archive["trainer/epoch"] == 2
        assert archive["model/0.W"].shape == (16, 1, 3, 3)
    assert {"model/6.b", "optim/steps", "rng/dropout"} <= names


def test_train_epochs_option_overrides_the_spec(tmp_path: Path, short_job: dict[str, Any]) -> None:
    result = trainq("train", _write_job(tmp_path, short_job), "--epochs", "1")
    assert result.returncode == 0, result.stderr
    progress = [line for line in result.stderr.splitlines() if line.startswith("epoch ")]
    assert [line.split()[1] for line in progress] == ["1/1"]
    assert "test_accuracy" in result.stdout


def test_train_epochs_option_is_checked_like_the_spec(
    tmp_path: Path, short_job: dict[str, Any]
) -> None:
    saved = tmp_path / "model.npz"
    result = trainq("train", _write_job(tmp_path, short_job), "--epochs", "0", "--save", saved)
    assert result.returncode == 2
    assert result.stderr == (
        "trainq: training.epochs: Input should be greater than or equal to 1\n"
    )
    assert result.stdout == ""
    assert not saved.exists()
    del short_job["training"]  # the option also sets it in a spec that leaves it out
    result = trainq("train", _write_job(tmp_path, short_job), "--epochs", "1")
    assert result.returncode == 0, result.stderr
    progress = [line for line in result.stderr.splitlines() if line.startswith("epoch ")]
    assert [line.split()[1] for line in progress] == ["1/1"]


def test_train_threads_option_splits_batches_and_rejects_zero(
    tmp_path: Path, short_job: dict[str, Any]
) -> None:
    path = _write_job(tmp_path, short_job)
    result = trainq("train", path, "--epochs", "1", "--threads", "2")
    assert result.returncode == 0, result.stderr
    assert "test_accuracy" in result.stdout
    result = trainq("train", path, "--threads", "0")
    assert result.returncode == 2
    assert "--threads: must be at least 1, got 0" in result.stderr


def test_summary_prints_layers_params_and_flops(tmp_path: Path) -> None:
    job = example_job("digits_cnn")
    result = trainq("summary", _write_job(tmp_path, job))
    assert result.returncode == 0, result.stderr
    digits = load_digits()
    summary = summarize(job["model"], digits.input_shape, digits.num_classes)
    assert result.stdout.strip() == str(summary)
    total = result.stdout.strip().splitlines()[-1]
    assert "loss: softmax_cross_entropy" in total
    assert f"{summary.params:,}" in total and f"{summary.flops:,}" in total
    assert summary.params == 16 * 9 + 16 + 256 * 64 + 64 + 64 * 10 + 10


def test_bad_spec_exits_2_naming_the_field(tmp_path: Path) -> None:
    job = example_job("digits_cnn")
    job["model"]["layers"][4]["units"] = 0
    for command in ("summary", "train"):
        result = trainq(command, _write_job(tmp_path, job))
        assert result.returncode == 2
        assert result.stderr.startswith("trainq: model.layers[4].units (dense):")
        assert result.stdout == ""


def test_spec_that_does_not_fit_the_dataset_exits_2(tmp_path: Path) -> None:
    job = example_job("digits_cnn")
    job["model"]["layers"][-1]["units"] = 7
    result = trainq("summary", _write_job(tmp_path, job))
    assert result.returncode == 2
    assert "trainq: model.loss: the dataset has 10 classes" in result.stderr


def test_missing_file_exits_2(tmp_path: Path) -> None:
    result = trainq("summary", tmp_path / "nope.json")
    assert result.returncode == 2
    assert "nope.json" in result.stderr


def test_file_that_is_not_json_exits_2_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "job.json"
    path.write_text('{"name": "x",\n')
    result = trainq("summary", path)
    assert result.returncode == 2
    assert result.stderr == (
        f"trainq: {path} is not JSON: Expecting property name enclosed in double quotes: "
        "line 2 column 1 (char 14)\n"
    )
    assert result.stdout == ""


def test_api_errors_read_as_messages_that_name_their_fields() -> None:
    from service.client import ApiError

    named = "model.layers[0].filters (conv2d): Input should be greater than or equal to 1"
    loc = ["body", "model", "layers", 0, "filters"]
    spec = ApiError(422, [{"loc": loc, "msg": named, "type": "value_error"}])
    assert str(spec) == f"HTTP 422: {named}"
    query = ApiError(
        422,
        [
            {"loc": ["query", "status"], "msg": "Input should be 'queued'", "type": "enum"},
            {"loc": ["query", "limit"], "msg": "Input should be greater than 0"},
        ],
    )
    assert str(query) == (
        "HTTP 422: status: Input should be 'queued'\n  limit: Input should be greater than 0"
    )
    assert str(ApiError(404, "job 99 not found")) == "HTTP 404: job 99 not found"


def test_db_upgrade_records_the_built_in_datasets_once(
    context: ServiceContext, tmp_path: Path
) -> None:
    """A team's deployment runs ``db upgrade`` and then the API: the built-ins
    (those this machine has) are there without ``trainq up``."""
    available = []
    for name in BUILTIN_DATASETS:
        try:
            load_dataset(name)
        except DatasetUnavailable:
            continue
        available.append(name)
    assert {"digits", "tiny_corpus", "tiny_sentiment"} <= set(available)
    settings = {"TRAINQ_HOME": str(tmp_path), "TRAINQ_DATABASE_URL": context.settings.database_url}
    for _ in range(2):
        result = trainq("db", "upgrade", **settings)
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines() == [
            "database at head",
            f"built-in datasets: {', '.join(available)}",
        ]
    with context.session_factory() as session:
        rows = session.scalars(select(DatasetVersion).order_by(DatasetVersion.name)).all()
        assert [(r.name, r.version, r.builtin, r.team_id) for r in rows] == [
            (name, 1, True, None) for name in sorted(available)
        ]
        digits = next(r for r in rows if r.name == "digits")
        assert (digits.input_shape, digits.num_classes, digits.num_samples) == ([1, 8, 8], 10, 1797)


def test_tokens_are_listed_by_id_and_revoked(context: ServiceContext, tmp_path: Path) -> None:
    settings = {"TRAINQ_HOME": str(tmp_path), "TRAINQ_DATABASE_URL": context.settings.database_url}
    made = {
        team: trainq("token", "create", "--team", team, **settings).stdout.splitlines()[-1]
        for team in ("vision", "speech")
    }
    listed = trainq("token", "list", **settings).stdout.splitlines()
    assert listed[0].split() == ["id", "team", "created"]
    rows = [line.split()[:2] for line in listed[1:]]
    assert [team for _, team in rows] == ["vision", "speech"]
    assert all(made["vision"] not in line for line in listed)  # ids, never the tokens
    assert [
        r.split()[1]
        for r in trainq("token", "list", "--team", "speech", **settings).stdout.splitlines()[1:]
    ] == ["speech"]

    vision_id = rows[0][0]
    revoked = trainq("token", "revoke", vision_id, **settings)
    assert (revoked.returncode, revoked.stdout) == (
        0,
        f"token {vision_id} of team 'vision' revoked; the API stops taking it within 30 s\n",
    )
    with context.session_factory() as session:
        assert team_for_token(session=session, token=made["vision"]) is None
        speech = team_for_token(session=session, token=made["speech"])
        assert speech is not None and speech.name == "speech"
    again = trainq("token", "revoke", vision_id, **settings)
    assert (again.returncode, again.stderr) == (
        2,
        f"trainq: no token {vision_id} ('trainq token list' shows them)\n",
    )
