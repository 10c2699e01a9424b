"""The deployment files are valid (Docker has no engine here: the config is checked)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.conftest import ROOT


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose not installed")
def test_compose_file_is_valid_and_has_every_role() -> None:
    result = subprocess.run(
        ["docker-compose", "config", "--services"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    services = set(result.stdout.split())
    assert {"postgres", "ray-head", "ray-worker", "api", "dispatcher", "migrate"} <= services
