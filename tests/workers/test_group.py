from __future__ import annotations

import os
import re
import signal
import time

import numpy as np
import pytest
import ray
from ray.util.placement_group import placement_group_table

from core.data import Dataset
from tests.workers.conftest import CNN, assert_same_weights, job_spec, setup_job
from tests.workers.probes import DataProbeWorker, FailingWorker
from workers.errors import (
    WorkerFailedError,
    WorkerGroupStartupError,
    WorkerGroupStartupTimeoutError,
)
from workers.group import StopRequested, WorkerGroup

pytestmark = pytest.mark.usefixtures("ray_session")


def placement_groups_alive() -> set[str]:
    return {pg_id for pg_id, info in placement_group_table().items() if info["state"] != "REMOVED"}


def actor_gone(name: str) -> bool:
    """Whether the named actor is dead (its name released, or its handle failing)."""
    try:
        handle = ray.get_actor(name)
    except ValueError:
        return True
    try:
        ray.get(handle.ping.remote(), timeout=30)
    except ray.exceptions.RayActorError:
        return True
    return False


def test_group_starts_ranks_in_order_and_shuts_down() -> None:
    before = placement_groups_alive()
    group = WorkerGroup.start(3, placement_strategy="SPREAD")
    status = group.poll_status()
    assert [w.rank for w in status.workers] == [0, 1, 2]
    assert status.all_alive and status.num_nodes == 1
    assert len({w.pid for w in status.workers}) == 3
    assert group.execute("ping") == [w.pid for w in status.workers]
    group.shutdown()
    group.shutdown()  # idempotent
    assert all(actor_gone(w.actor_name) for w in status.workers)
    assert placement_groups_alive() == before


def test_workers_run_one_blas_thread_whatever_their_node_says() -> None:
    """A product's bits depend on BLAS's thread count, so every worker pins the same one."""
    from workers.worker import TrainWorker

    env = {"env_vars": {"OPENBLAS_NUM_THREADS": "2", "OMP_NUM_THREADS": "2"}}
    actor = ray.remote(TrainWorker).options(num_cpus=0, runtime_env=env).remote(0, 1)
    try:
        info = ray.get(actor.info.remote(), timeout=120)
        assert info.blas_threads == (1,)
    finally:
        ray.kill(actor)
    group = WorkerGroup.start(2)
    try:
        assert all(info.blas_threads == (1,) for info in group.execute("info"))
    finally:
        group.shutdown()


def test_resources_that_never_come_time_out_and_leave_nothing_behind() -> None:
    before = placement_groups_alive()
    with pytest.raises(WorkerGroupStartupTimeoutError) as timed_out:
        WorkerGroup.start(2, resources_per_worker={"no_such_accelerator": 1}, startup_timeout_s=1)
    cpus = ray.cluster_resources()["CPU"]
    assert re.fullmatch(
        r"2 workers with 1 CPU and 1 no_such_accelerator each \(PACK\) could not be placed "
        rf"within 1 s: the cluster has {cpus:g} CPUs \([0-9.]+ free\), 0 GPUs and "
        r"0 no_such_accelerator on 1 node",
        str(timed_out.value),
    ), timed_out.value
    assert placement_groups_alive() == before


def test_a_start_waiting_for_resources_stops_when_asked_and_leaves_nothing_behind() -> None:
    before = placement_groups_alive()
    stop_at = time.monotonic() + 0.5
    with pytest.raises(StopRequested):  # not the start-up timeout (120 s) of a wait unasked
        WorkerGroup.start(
            int(ray.cluster_resources()["CPU"]) + 1, should_stop=lambda: time.monotonic() > stop_at
        )
    assert placement_groups_alive() == before


def test_a_worker_that_fails_to_start_fails_the_group_and_the_rest_are_killed() -> None:
    before = placement_groups_alive()
    with pytest.raises(WorkerGroupStartupError, match="failed to start"):
        WorkerGroup.start(3, worker_cls=FailingWorker)
    assert placement_groups_alive() == before


def test_a_killed_worker_surfaces_as_worker_failed_naming_its_rank() -> None:
    with WorkerGroup.start(2) as group:
        os.kill(group.infos[1].pid, signal.SIGKILL)
        with pytest.raises(WorkerFailedError) as failure:
            group.execute("ping")
        assert failure.value.rank == 1
        status = group.poll_status()
        assert [w.alive for w in status.workers] == [True, False]


def test_replicas_start_identical_and_stay_identical(digits: Dataset) -> None:
    job = job_spec(CNN)
    with WorkerGroup.start(3, worker_cls=DataProbeWorker) as group:
        setup_job(group, digits, job)
        first = group.execute("weights")
        for other in first[1:]:
            assert_same_weights(first[0], other)
        # The dataset is read in place from the object store, not copied into each worker.
        assert group.execute("data_flags") == [{"writeable": False, "owndata": False}] * 3
        group.setup_allreduce("ray", num_slots=4)
        results = [group.execute("train_step", 0, b) for b in range(3)]
        assert all(r.finite for step in results for r in step)
        assert [step[0].step for step in results] == [1, 2, 3]
        after = group.execute("weights")
        for other in after[1:]:
            assert_same_weights(after[0], other)
        assert not np.array_equal(after[0]["0.W"], first[0]["0.W"])


def test_fast_mode_keeps_replicas_identical(digits: Dataset) -> None:
    with WorkerGroup.start(2) as group:
        setup_job(group, digits, job_spec(), deterministic=False)
        group.setup_allreduce("ray", num_slots=2)
        for b in range(3):
            group.execute("train_step", 0, b)
        weights = group.execute("weights")
        assert_same_weights(weights[0], weights[1])
