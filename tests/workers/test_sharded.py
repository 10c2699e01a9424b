"""A node's workers sharing one copy of the parameters step exactly like replicas that
each keep their own."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from core.checkpoint import from_npz_bytes
from core.data import Dataset
from tests.workers.conftest import MLP, assert_same_weights, job_spec, setup_job
from workers.group import WorkerGroup

pytestmark = pytest.mark.usefixtures("ray_session")

STEPS = 5  # a whole epoch of the 300 digits, so the last step measures update ratios


def run_steps(
    dataset: Dataset, workers: int, optimizer: dict[str, Any], *, shared: bool
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, float]]:
    """Weights, checkpoint and per-layer diagnostics after ``STEPS`` steps;
    ``shared=False`` copies rows in and out of the all-reduce, so every replica steps
    all of its own parameters."""
    job = {**job_spec(MLP, grad_clip_norm=0.5, batch_size=64), "optimizer": optimizer}
    with WorkerGroup.start(workers) as group:
        setup_job(group, dataset, job, micro_shards=8)
        group.setup_allreduce("ray", num_slots=8, **({} if shared else {"resident_max_bytes": 0}))
        sharing = group.gather(
            [a.__ray_call__.remote(lambda w: w._node_optimizer is not None) for a in group.actors]
        )
        assert sharing == [shared] * workers
        for batch in range(STEPS):
            assert all(result.finite for result in group.execute("train_step", 0, batch))
        diagnostics = group.execute("finish_epoch", 0, evaluate=False)[0].diagnostics
        weights = group.execute_on(0, "weights")
        checkpoint = from_npz_bytes(group.execute_on(0, "save"))
    return weights, checkpoint, diagnostics


@pytest.mark.parametrize(
    "optimizer",
    [
        {"type": "sgd", "lr": 0.1, "momentum": 0.9, "dampening": 0.1, "weight_decay": 1e-3},
        {"type": "adamw", "lr": 0.01},
    ],
    ids=["sgd-momentum", "adamw"],
)
def test_shared_parameters_step_like_private_replicas(
    optimizer: dict[str, Any], digits: Dataset
) -> None:
    weights, checkpoint, diagnostics = run_steps(digits, 2, optimizer, shared=True)
    private_weights, private_checkpoint, private_diagnostics = run_steps(
        digits, 2, optimizer, shared=False
    )
    assert {k.split("/")[0] for k in diagnostics} == {"grad_norm", "update_ratio"}
    assert diagnostics == private_diagnostics
    assert_same_weights(weights, private_weights)
    optimizer_state = {k for k in checkpoint if k.startswith("optim/")}
    assert optimizer_state == {k for k in private_checkpoint if k.startswith("optim/")}
    assert any(k.endswith(("momentum", "exp_avg_sq")) for k in optimizer_state)
    for name in optimizer_state:
        np.testing.assert_array_equal(checkpoint[name], private_checkpoint[name], err_msg=name)
