"""The command line's API client against a real uvicorn, and against nothing."""

from __future__ import annotations

import itertools
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from core import load_dataset
from service import client as client_module
from service import queue
from service.api import jobs as jobs_api
from service.auth import create_token
from service.cli import UPLOAD_FORMATS
from service.client import ApiError, ApiUnreachable, Client
from service.context import ServiceContext
from service.datasets import UPLOAD_KINDS, register_builtins
from service.dispatcher import Dispatcher
from tests.factories import ROOT
from tests.servers import CuttingProxy, free_port, serving
from tests.service.factories import TRIVIAL_SPEC, sentiment_classifier
from tests.service.test_cli import TIMEOUT_S, trainq


@pytest.fixture
def served(context: ServiceContext) -> Iterator[tuple[str, str]]:
    """The API on a free port (no Ray: these routes do not need it), and a token."""
    with context.session_factory() as session:
        register_builtins(session=session)
        _, token = create_token(session=session, team_name="cli")
    with serving(context) as url:
        yield url, token


def test_an_error_on_a_streamed_route_reads_as_its_detail(served: tuple[str, str]) -> None:
    url, token = served
    with pytest.raises(ApiError) as info:
        next(Client(url, token).events(4040))
    assert (info.value.status_code, str(info.value)) == (404, "HTTP 404: job 4040 not found")


@pytest.mark.parametrize("command", [("jobs",), ("watch", "1"), ("metrics", "1")])
def test_no_api_listening_is_one_line_naming_the_url(command: tuple[str, ...]) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # free: nothing listens there
    result = trainq(*command, "--url", url, "--token", "tq_x")
    assert result.returncode == 1
    assert result.stderr.startswith(f"trainq: no answer from the API at {url} (")
    assert result.stderr.endswith(
        "is 'trainq up' or 'trainq api' running there? (--url or TRAINQ_URL says where)\n"
    )
    assert result.stderr.count("\n") == 1 and result.stdout == ""


def test_cancel_a_queued_and_a_running_job_and_one_that_ended(
    served: tuple[str, str], context: ServiceContext
) -> None:
    url, token = served
    client = Client(url, token)
    first, second = (client.submit(TRIVIAL_SPEC)["id"] for _ in range(2))
    claimed = queue.claim_next_job(session_factory=context.session_factory, owner="d", lease_s=60.0)
    assert claimed is not None and claimed.id == first  # the older of equal priority
    running, queued = first, second
    cancel = ("cancel", "--url", url, "--token", token)

    result = trainq(*cancel, str(queued))
    assert (result.returncode, result.stdout) == (0, f"job {queued} cancelled\n")
    result = trainq(*cancel, str(running))
    assert (result.returncode, result.stdout) == (
        0,
        f"job {running} running: asked to stop; it stops within seconds\n",
    )
    assert client.job(running)["cancel_requested"]
    result = trainq(*cancel, str(queued))
    assert (result.returncode, result.stderr) == (
        1,
        f"trainq: HTTP 409: job {queued} has already been cancelled\n",
    )


def _fail(context: ServiceContext, job_id: int, attempt: int, error: str, *, again: bool) -> None:
    """Fails the job's attempt with ``error``; with ``again``, it is queued with no
    backoff and claimed at once by another dispatcher, as attempt + 1."""
    factory = context.session_factory
    retry = queue.RetryStrategy(base_s=0.0) if again else None
    queue.fail_attempt(
        session_factory=factory, job_id=job_id, attempt=attempt, error=error, retry=retry
    )
    if again:
        claimed = queue.claim_next_job(session_factory=factory, owner="d2", lease_s=60.0)
        assert claimed is not None and (claimed.id, claimed.attempt) == (job_id, attempt + 1)


def _submitted_and_claimed(
    url: str, token: str, context: ServiceContext, spec: dict[str, Any] = TRIVIAL_SPEC
) -> int:
    job_id = Client(url, token).submit(spec)["id"]
    claimed = queue.claim_next_job(session_factory=context.session_factory, owner="d", lease_s=60.0)
    assert claimed is not None and (claimed.id, claimed.attempt) == (job_id, 1)
    return int(job_id)


def test_events_tell_each_attempt_as_it_starts_and_ends(
    served: tuple[str, str], context: ServiceContext
) -> None:
    url, token = served
    client = Client(url, token)
    job_id = _submitted_and_claimed(url, token, context)
    events = client.events(job_id)
    first = [next(events), next(events)]
    assert [(kind, data.get("number"), data["status"]) for kind, data in first] == [
        ("attempt", 1, "running"),
        ("status", None, "running"),
    ]

    # Failed and started again between two polls: the job is "running" before and after.
    _fail(context, job_id, 1, "RuntimeError: boom", again=True)
    queue.finish_attempt(
        session_factory=context.session_factory,
        job_id=job_id,
        attempt=2,
        status=queue.JobStatus.succeeded,
    )
    rest = list(events)
    assert [(kind, data.get("number"), data["status"]) for kind, data in rest] == [
        ("attempt", 1, "failed"),
        ("attempt", 2, "succeeded"),
        ("status", None, "succeeded"),
    ]
    assert [data for _, data in rest[:2]] == client.job(job_id)["attempt_history"]
    assert rest[0][1]["error"] == "RuntimeError: boom"


@contextmanager
def _watching(url: str, token: str, job_id: int) -> Iterator[subprocess.Popen[str]]:
    """``trainq watch JOB`` as a process whose output the test reads line by line; one
    that a line never comes to is killed after ``TIMEOUT_S``, which ends the test."""
    watch = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "watch", str(job_id), "--url", url, "--token", token],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    stuck = threading.Timer(TIMEOUT_S, watch.kill)
    stuck.start()
    try:
        yield watch
    finally:
        stuck.cancel()
        watch.kill()
        watch.wait()


def test_watch_says_when_an_attempt_fails_and_the_next_starts(
    served: tuple[str, str], context: ServiceContext
) -> None:
    url, token = served
    job_id = _submitted_and_claimed(url, token, context)
    assert queue.record_event(
        session_factory=context.session_factory,
        job_id=job_id,
        attempt=1,
        kind="group_started",
        epoch=0,
        step=0,
        message="1 workers on 1 node(s)",
    )
    with _watching(url, token, job_id) as watch:
        assert watch.stderr is not None
        assert [watch.stderr.readline() for _ in range(2)] == [
            "group_started: 1 workers on 1 node(s)\n",
            "status: running\n",
        ]
        _fail(context, job_id, 1, "MemoryError: out of memory", again=True)
        assert [watch.stderr.readline() for _ in range(2)] == [
            "attempt 1 failed: MemoryError: out of memory\n",
            "attempt 2 started\n",
        ]
        _fail(context, job_id, 2, "MemoryError: out of memory", again=False)
        out, err = watch.communicate(timeout=TIMEOUT_S)
    assert watch.returncode == 1
    assert err.splitlines() == ["attempt 2 failed: MemoryError: out of memory", "status: failed"]
    assert out.splitlines() == [
        f"job {job_id} trivial: running (epoch 0/1)",
        f"job {job_id} failed",
        "  error: MemoryError: out of memory",
    ]


def test_jobs_shows_how_far_a_running_job_is_and_how_long_it_has_left(
    served: tuple[str, str], context: ServiceContext
) -> None:
    url, token = served
    spec = TRIVIAL_SPEC | {"training": {"epochs": 4}}
    job_id = Client(url, token).submit(spec)["id"]
    claimed = queue.claim_next_job(session_factory=context.session_factory, owner="d", lease_s=60.0)
    assert claimed is not None and claimed.id == job_id
    queue.write_metrics(
        session_factory=context.session_factory,
        job_id=job_id,
        attempt=claimed.attempt,
        rows=[("epoch", 7, 1.0), ("epoch_time_s", 7, 75.5)],
    )
    listed = trainq("jobs", "--url", url, "--token", token)
    assert listed.returncode == 0, listed.stderr
    row = listed.stdout.splitlines()[1]
    assert row.startswith(f"{job_id:>6}  running    trivial ")
    assert row.endswith(" epoch 1/4, about 4 min left")  # 3 epochs of 75.5 s


def test_describe_says_what_happened_to_a_job(
    served: tuple[str, str], context: ServiceContext
) -> None:
    url, token = served
    factory = context.session_factory
    job_id = _submitted_and_claimed(url, token, context)
    _fail(context, job_id, 1, "MemoryError: out of memory", again=True)
    fence = {"session_factory": factory, "job_id": job_id, "attempt": 2}
    assert queue.record_event(
        **fence, kind="group_started", epoch=0, step=0, message="1 workers on 1 node(s)"
    )
    assert queue.write_metrics(**fence, rows=[("epoch", 12, 1.0), ("epoch_time_s", 12, 2.0)])
    assert queue.finish_attempt(
        **fence,
        status=queue.JobStatus.succeeded,
        final_metrics={"val_accuracy": 0.5, "grad_norm/1.dense": 3.0},
    )
    described = trainq("describe", str(job_id), "--url", url, "--token", token)
    assert described.returncode == 0, described.stderr
    lines = described.stdout.splitlines()
    assert lines[:3] == [
        f"job {job_id} trivial: succeeded",
        "  dataset    digits v1",
        "  progress   epoch 1/1",
    ]
    assert lines[3].startswith("  times      submitted ") and "; waited " in lines[3]
    assert lines[4:] == [
        "  attempts",
        "    1 failed on d: MemoryError: out of memory",
        "    2 succeeded on d2",
        "  run events",
        "    attempt 2, after epoch 0: group_started: 1 workers on 1 node(s)",
        "  final metrics",
        "    val_accuracy 0.5",
    ]


def test_upload_list_and_download_from_the_command_line(
    served: tuple[str, str], context: ServiceContext, tmp_path: Path
) -> None:
    url, token = served
    at = ("--url", url, "--token", token)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((30, 4)).astype(np.float32)
    upload = tmp_path / "blobs.npz"
    np.savez(upload, X=X, y=(X[:, 0] > 0).astype(np.int64))
    result = trainq("upload", "blobs", upload, *at)
    assert (result.returncode, result.stdout) == (
        0,
        "dataset blobs version 1: tabular, 30 samples of 4\n",
    )
    listed = trainq("datasets", "blobs", *at).stdout.splitlines()
    assert listed[1].split() == ["blobs", "1", "tabular", "4", "2", "30"]
    assert "digits" in trainq("datasets", *at).stdout
    unknown = trainq("upload", "blobs", tmp_path / "blobs.data", *at)
    assert (unknown.returncode, unknown.stderr) == (
        2,
        f"trainq: {tmp_path / 'blobs.data'}: cannot tell its format from its name; "
        "--format is one of npz, csv, txt\n",
    )
    assert UPLOAD_FORMATS == UPLOAD_KINDS

    job_id = _submitted_and_claimed(url, token, context)
    fence = {"session_factory": context.session_factory, "job_id": job_id, "attempt": 1}
    missing = trainq("download", str(job_id), "-o", tmp_path / "model.npz", *at)
    assert (missing.returncode, missing.stderr) == (
        1,
        f"trainq: HTTP 404: job {job_id} has no model yet (status running)\n",
    )
    checkpoint, model = b"checkpoint of epoch 1", b"the final model"
    assert queue.record_checkpoint(
        **fence,
        epoch=1,
        step=9,
        sha256=context.store.put(checkpoint),
        size_bytes=len(checkpoint),
    )
    assert queue.finish_attempt(
        **fence, status=queue.JobStatus.succeeded, model_sha256=context.store.put(model)
    )
    saved = subprocess.run(  # to the default file, in the working directory
        [sys.executable, "-m", "service.cli", "download", str(job_id), *at],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert saved.stdout == f"saved job-{job_id}.npz ({len(model)} bytes)\n", saved.stderr
    assert (tmp_path / f"job-{job_id}.npz").read_bytes() == model
    saved = trainq("download", str(job_id), "--epoch", "1", "-o", tmp_path / "c.npz", *at)
    assert saved.returncode == 0 and (tmp_path / "c.npz").read_bytes() == checkpoint


def test_a_queued_job_says_how_many_jobs_are_ahead(served: tuple[str, str]) -> None:
    url, token = served
    client = Client(url, token)
    first, second = (client.submit(TRIVIAL_SPEC)["id"] for _ in range(2))
    described = trainq("describe", str(second), "--url", url, "--token", token)
    assert described.stdout.splitlines()[2] == "  progress   epoch 0/1; 1 job(s) ahead in the queue"
    with _watching(url, token, second) as watch:
        assert watch.stderr is not None
        assert watch.stderr.readline() == "status: queued\n"
        client.cancel(second)
        out, _ = watch.communicate(timeout=TIMEOUT_S)
    assert out.splitlines()[0] == f"job {second} trivial: queued (1 job(s) ahead)"
    assert client.job(first)["status"] == "queued"


def test_events_go_on_where_they_were_after_the_connection_drops(
    served: tuple[str, str], context: ServiceContext
) -> None:
    url, token = served
    job_id = _submitted_and_claimed(url, token, context)
    fence = {"session_factory": context.session_factory, "job_id": job_id, "attempt": 1}
    first = [("loss", 5, 0.9), ("epoch", 10, 1.0), ("val_loss", 10, 0.8)]
    then = [("loss", 15, 0.7), ("epoch", 20, 2.0), ("val_loss", 20, 0.6)]
    assert queue.write_metrics(**fence, rows=first)
    proxy = CuttingProxy(int(url.rsplit(":", 1)[1]))
    try:
        events = Client(f"http://127.0.0.1:{proxy.port}", token).events(job_id)
        got = [next(events) for _ in range(len(first) + 2)]  # and the attempt, the status
        proxy.cut()
        assert queue.record_event(**fence, kind="restored", epoch=1, step=10, message="back")
        assert queue.write_metrics(**fence, rows=then)
        assert queue.finish_attempt(**fence, status=queue.JobStatus.succeeded)
        got += list(events)
    finally:
        proxy.close()
    metrics = [(d["name"], d["step"], d["value"]) for kind, d in got if kind == "metric"]
    assert sorted(set(metrics)) == sorted(first + then)  # each at least once
    assert [d["message"] for kind, d in got if kind == "run"] == ["back"]
    assert [d["status"] for kind, d in got if kind == "status"][-1] == "succeeded"


def test_watch_prints_each_epoch_once_across_a_dropped_connection(
    served: tuple[str, str], context: ServiceContext
) -> None:
    url, token = served
    spec = TRIVIAL_SPEC | {"training": {"epochs": 2}}
    job_id = _submitted_and_claimed(url, token, context, spec)
    fence = {"session_factory": context.session_factory, "job_id": job_id, "attempt": 1}
    assert queue.write_metrics(**fence, rows=[("train_loss", 10, 0.5), ("epoch", 10, 1.0)])
    proxy = CuttingProxy(int(url.rsplit(":", 1)[1]))
    try:
        with _watching(f"http://127.0.0.1:{proxy.port}", token, job_id) as watch:
            assert watch.stderr is not None
            assert [watch.stderr.readline() for _ in range(2)] == [
                "epoch 1/2  train_loss 0.5\n",
                "status: running\n",
            ]
            proxy.cut()
            assert queue.write_metrics(**fence, rows=[("train_loss", 20, 0.25), ("epoch", 20, 2.0)])
            assert queue.finish_attempt(**fence, status=queue.JobStatus.succeeded)
            out, err = watch.communicate(timeout=TIMEOUT_S)
    finally:
        proxy.close()
    assert watch.returncode == 0, err
    assert err.splitlines() == ["epoch 2/2  train_loss 0.25", "status: succeeded"]
    assert out.splitlines()[-1] == f"job {job_id} succeeded"


def test_predict_from_a_file_or_texts(
    served: tuple[str, str], context: ServiceContext, tmp_path: Path
) -> None:
    url, token = served
    at = ("--url", url, "--token", token)
    client = Client(url, token)
    digits_job = client.submit(TRIVIAL_SPEC)["id"]
    moods_job = client.submit(sentiment_classifier(epochs=1))["id"]
    dispatcher = Dispatcher(context)  # the in-process runner: no Ray needed
    assert dispatcher.run_once() and dispatcher.run_once()

    X = load_dataset("digits").X_test[:4]
    np.savez(tmp_path / "rows.npz", X=X)
    expected = client.predict(digits_job, X.tolist())
    result = trainq("predict", str(digits_job), tmp_path / "rows.npz", *at)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [str(p) for p in expected["predictions"]]
    (tmp_path / "rows.json").write_text(json.dumps({"inputs": X[:2].tolist()}))
    answer = trainq("predict", str(digits_job), tmp_path / "rows.json", "--json", *at)
    assert json.loads(answer.stdout)["predictions"] == expected["predictions"][:2]

    texts = trainq("predict", str(moods_job), "--text", "a lovely film", "--text", "dull", *at)
    assert texts.returncode == 0, texts.stderr
    assert texts.stdout.splitlines() == [
        str(p) for p in client.predict(moods_job, ["a lovely film", "dull"])["predictions"]
    ]

    np.savez(tmp_path / "other.npz", rows=X)
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    for args, said in (
        ((), "predict needs rows: a .npz (array X) or .json file, or --text"),
        ((tmp_path / "other.npz",), f"{tmp_path / 'other.npz'} has no array X (it has rows)"),
        ((tmp_path / "broken.npz",), f"{tmp_path / 'broken.npz'} is not an .npz of numbers"),
    ):
        refused = trainq("predict", str(digits_job), *args, *at)
        assert refused.returncode == 2 and refused.stderr.startswith(f"trainq: {said}")


def test_a_quiet_stream_sends_keepalives_and_a_silent_one_counts_as_dropped(
    served: tuple[str, str], context: ServiceContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, token = served
    job_id = _submitted_and_claimed(url, token, context)  # running, and nothing to tell
    monkeypatch.setattr(jobs_api, "EVENTS_KEEPALIVE_S", 0.0)
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.stream("GET", f"{url}/api/v1/jobs/{job_id}/events", headers=headers) as response:
        lines = response.iter_lines()
        told = [line for line in itertools.islice(lines, 12) if line.startswith(("event:", ":"))]
    assert told[:2] == ["event: attempt", "event: status"]
    assert set(told[2:]) == {": keepalive"}  # a comment, which clients skip

    # a server that answers and then says nothing: the client's read times out
    silent = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=_answer_then_nothing, args=(silent,), daemon=True).start()
    monkeypatch.setattr(client_module, "EVENTS_READ_TIMEOUT_S", 0.5)
    silent_url = f"http://127.0.0.1:{silent.getsockname()[1]}"
    with pytest.raises(ApiUnreachable, match="ReadTimeout|timed out"):
        next(Client(silent_url, token).events(job_id))
    silent.close()


def _answer_then_nothing(listener: socket.socket) -> None:
    with suppress(OSError):
        connection, _ = listener.accept()
        connection.recv(65536)
        connection.sendall(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\n\r\n"
        )
        time.sleep(5)
        connection.close()
