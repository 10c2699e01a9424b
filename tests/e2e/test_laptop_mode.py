"""`trainq up` is the whole service in one command; the CLI drives it over HTTP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.conftest import ROOT
from tests.servers import free_port

STARTUP_TIMEOUT_S = 120.0
JOB_TIMEOUT_S = 300.0


def _trainq(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=JOB_TIMEOUT_S,
    )


def test_up_then_submit_watch_jobs_and_metrics(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "TRAINQ_"))}
    env |= {
        "TRAINQ_HOME": str(tmp_path / "home"),
        "TRAINQ_URL": f"http://127.0.0.1:{port}",
        "PYTHONPATH": str(ROOT),
        "OPENBLAS_NUM_THREADS": "1",
    }
    log = (tmp_path / "up.log").open("w")
    up = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "up", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
    )
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert up.poll() is None, (tmp_path / "up.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "trainq up did not become ready"
            time.sleep(0.5)
        token_file = tmp_path / "home" / "token"
        assert token_file.read_text().strip().startswith("tq_")

        spec = json.loads((ROOT / "examples" / "digits_cnn.json").read_text())
        spec["training"]["epochs"] = 3
        job_file = tmp_path / "job.json"
        job_file.write_text(json.dumps(spec))
        submitted = _trainq("submit", str(job_file), env=env)
        assert submitted.returncode == 0, submitted.stderr
        assert submitted.stdout.startswith("job 1 queued")

        watched = _trainq("watch", "1", env=env)
        assert watched.returncode == 0, watched.stdout + watched.stderr
        assert "epoch 3/3" in watched.stderr and "job 1 succeeded" in watched.stdout

        listed = _trainq("jobs", env=env)
        assert "succeeded" in listed.stdout and "digits-cnn" in listed.stdout
        metrics = _trainq("metrics", "1", "--names", "val_accuracy", env=env)
        lines = metrics.stdout.splitlines()
        assert lines[0] == "name,step,value" and len(lines) == 4

        bad = _trainq("submit", str(ROOT / "README.md"), env=env)
        assert bad.returncode != 0
        spec["model"]["layers"][0]["filters"] = 0
        job_file.write_text(json.dumps(spec))
        refused = _trainq("submit", str(job_file), env=env)
        assert refused.returncode == 1
        assert refused.stderr == (
            "trainq: HTTP 422: model.layers[0].filters (conv2d): "
            "Input should be greater than or equal to 1\n"
        )
        assert "1 of 1 jobs" in _trainq("jobs", env=env).stdout
    finally:
        up.send_signal(signal.SIGINT)
        try:
            up.wait(timeout=60)
        except subprocess.TimeoutExpired:
            up.kill()
            up.wait()
        log.close()
        first_lines = up.stdout.read() if up.stdout else ""
    assert "admin token for team 'default'" in first_lines
    # The local Ray keeps its token authentication, chosen explicitly: no warning about it.
    assert "Token authentication" not in (tmp_path / "up.log").read_text()
