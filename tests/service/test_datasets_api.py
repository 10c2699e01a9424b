from __future__ import annotations

import io

import numpy as np
from sqlalchemy import func, select

from service.models import DatasetVersion
from tests.service.conftest import Api


def _npz(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _uploaded(api: Api) -> int:
    with api.context.session_factory() as session:
        return (
            session.scalar(
                select(func.count())
                .select_from(DatasetVersion)
                .where(DatasetVersion.team_id.is_not(None))
            )
            or 0
        )


def _post(api: Api, data: bytes, *, name: str = "blobs", fmt: str = "npz", headers=None):  # noqa: ANN001, ANN202
    return api.client.post(
        "/api/v1/datasets",
        params={"name": name, "format": fmt},
        content=data,
        headers=headers or api.a,
    )


def test_builtins_are_listed_for_every_team(api: Api) -> None:
    for headers in (api.a, api.b):
        names = {
            d["name"] for d in api.client.get("/api/v1/datasets", headers=headers).json()["data"]
        }
        assert "digits" in names
    digits = api.client.get("/api/v1/datasets/digits", headers=api.a).json()["data"]
    assert digits[0]["builtin"] and digits[0]["input_shape"] == [1, 8, 8]
    assert digits[0]["num_classes"] == 10 and digits[0]["num_samples"] == 1797
    assert (digits[0]["label_shape"], digits[0]["vocab_size"]) == ([], None)


def test_npz_upload_makes_versions_and_a_job_can_train_on_it(api: Api) -> None:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(120, 5)).astype(np.float32)
    y = (X[:, 0] > 0).astype(np.int64)
    first = _post(api, _npz(X=X, y=y))
    assert first.status_code == 201, first.text
    assert first.json() | {"created_at": None} == {
        "name": "blobs",
        "version": 1,
        "kind": "tabular",
        "builtin": False,
        "input_shape": [5],
        "num_classes": 2,
        "num_samples": 120,
        "label_shape": [],
        "vocab_size": None,
        "created_at": None,
    }
    second = _post(api, _npz(X=X[:60], y=y[:60]))
    assert second.json()["version"] == 2
    versions = api.client.get("/api/v1/datasets/blobs", headers=api.a).json()
    assert [v["version"] for v in versions["data"]] == [1, 2]
    # another team neither sees it nor can use it
    assert api.client.get("/api/v1/datasets/blobs", headers=api.b).status_code == 404

    spec = {
        "name": "blobs-mlp",
        "dataset": {"name": "blobs", "version": 1},
        "model": {"layers": [{"type": "dense", "units": 2}], "loss": "softmax_cross_entropy"},
        "optimizer": {"type": "sgd", "lr": 0.1},
    }
    job = api.client.post("/api/v1/jobs", json=spec, headers=api.a)
    assert job.status_code == 201 and job.json()["dataset_version"] == 1
    latest = api.client.post(
        "/api/v1/jobs", json={**spec, "dataset": {"name": "blobs"}}, headers=api.a
    )
    assert latest.json()["dataset_version"] == 2
    assert api.client.post("/api/v1/jobs", json=spec, headers=api.b).status_code == 422


def test_a_submission_after_an_upload_uses_the_new_version(api: Api) -> None:
    """Submissions reuse dataset resolutions; an upload in between still counts."""
    rng = np.random.default_rng(1)
    X = rng.normal(size=(80, 5)).astype(np.float32)
    y = (X[:, 0] > 0).astype(np.int64)
    assert _post(api, _npz(X=X, y=y)).status_code == 201
    spec = {
        "name": "blobs-mlp",
        "dataset": {"name": "blobs"},
        "model": {"layers": [{"type": "dense", "units": 2}], "loss": "softmax_cross_entropy"},
        "optimizer": {"type": "sgd", "lr": 0.1},
    }
    for expected_version in (1, 1, 2, 2):
        if expected_version == 2 and _uploaded(api) == 1:
            assert _post(api, _npz(X=X[:40], y=y[:40])).json()["version"] == 2
        job = api.client.post("/api/v1/jobs", json=spec, headers=api.a)
        assert job.status_code == 201 and job.json()["dataset_version"] == expected_version

    # a team's upload shadows the built-in of the same name from the next submission on
    conv = {
        "name": "digits-cnn",
        "dataset": {"name": "digits"},
        "model": {
            "layers": [
                {"type": "conv2d", "filters": 4, "kernel_size": 3, "padding": 1},
                {"type": "flatten"},
                {"type": "dense", "units": 10},
            ],
            "loss": "softmax_cross_entropy",
        },
        "optimizer": {"type": "sgd", "lr": 0.1},
    }
    assert api.client.post("/api/v1/jobs", json=conv, headers=api.a).status_code == 201
    digits_labels = rng.integers(0, 10, size=80)
    assert _post(api, _npz(X=X, y=digits_labels), name="digits").status_code == 201
    refused = api.client.post("/api/v1/jobs", json=conv, headers=api.a)
    assert refused.status_code == 422, refused.text
    assert refused.json()["detail"][0]["loc"][:3] == ["body", "model", "layers"]
    # the other team still gets the built-in
    assert api.client.post("/api/v1/jobs", json=conv, headers=api.b).status_code == 201


def test_csv_upload_with_a_label_column(api: Api) -> None:
    rows = ["a,b,label"] + [f"{i * 0.1:.1f},{-i * 0.2:.1f},{i % 3}" for i in range(30)]
    response = _post(api, "\n".join(rows).encode(), name="table", fmt="csv")
    assert response.status_code == 201, response.text
    body = response.json()
    assert (body["input_shape"], body["num_classes"], body["num_samples"]) == ([2], 3, 30)


def test_bad_uploads_are_refused_and_store_nothing(api: Api) -> None:
    object_array = _npz(X=np.array([{"a": 1}], dtype=object), y=np.array([0]))
    cases = [
        (_npz(X=np.zeros((3, 2))), "npz", "'X' and 'y'"),
        (object_array, "npz", "pickle"),
        (b"not a zip", "npz", ""),
        (_npz(X=np.zeros((3, 2)), y=np.zeros(4)), "npz", "X must be"),
        (_npz(X=np.full((3, 2), np.nan), y=np.zeros(3)), "npz", "NaN"),
        (b"a,label\nx,1\n", "csv", "number"),
        (b"a,label\n", "csv", "header row"),
    ]
    for data, fmt, words in cases:
        response = _post(api, data, fmt=fmt)
        assert response.status_code == 422, (words, response.text)
        assert words.lower() in response.json()["detail"][0]["msg"].lower()
    assert _post(api, b"", name="Bad Name!").status_code == 422
    assert _post(api, b"", fmt="exe").status_code == 422
    api.context.settings.max_upload_bytes = 10
    assert _post(api, b"x" * 11).status_code == 413
    assert _uploaded(api) == 0


def test_text_uploads_corpus_and_labelled_csv(api: Api) -> None:
    corpus = ("the quick brown fox jumps over the lazy dog.\n" * 60).encode()
    lm = _post(api, corpus, name="foxes", fmt="txt")
    assert lm.status_code == 201, lm.text
    assert lm.json()["kind"] == "text_lm" and lm.json()["input_shape"] == [64]
    rows = ["text,label"] + [
        f"good day number {i},pos" if i % 2 else f"bad day {i},neg" for i in range(40)
    ]
    labelled = _post(api, "\n".join(rows).encode(), name="moods", fmt="csv")
    assert labelled.status_code == 201, labelled.text
    assert labelled.json()["kind"] == "text_classification"
    assert labelled.json()["num_classes"] == 2

    from service.datasets import load_version, resolve_version

    with api.context.session_factory() as session:
        from service.models import Team

        team = session.scalars(select(Team).where(Team.name == "team-a")).one()
        version = resolve_version(session=session, team=team, name="moods", version=None)
        dataset = load_version(store=api.context.store, version=version)
    assert dataset.kind == "text_classification" and "tokenizer" in dataset.meta
    assert _post(api, b"\xff\xfe not utf8", name="bad", fmt="txt").status_code == 422


def test_openapi_declares_the_upload_as_a_binary_body(api: Api) -> None:
    document = api.client.get("/openapi.json").json()
    upload = document["paths"]["/api/v1/datasets"]["post"]
    body = upload["requestBody"]
    assert body["required"] is True
    assert body["content"] == {
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
    }
    assert {p["name"] for p in upload["parameters"] if p["in"] == "query"} == {"name", "format"}
