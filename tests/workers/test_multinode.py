from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import ROOT

#: Generous: two Ray nodes starting on a small machine.
MULTINODE_TIMEOUT_S = 240


def test_workers_on_two_nodes_train_like_workers_on_one() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run(
        [sys.executable, "-m", "tests.workers.multinode_job"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=MULTINODE_TIMEOUT_S,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    two_nodes = report["two_nodes"]
    assert two_nodes[0] == two_nodes[2] != two_nodes[1] == two_nodes[3]
    assert len(set(report["one_node"])) == 1
    assert report["same_weights"] and report["same_metrics"]
    assert report["epochs"] == 2
