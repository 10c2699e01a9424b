from __future__ import annotations

import itertools
import uuid

import numpy as np
import pytest
import ray

from tests.workers.conftest import available
from tests.workers.probes import ReduceProbe
from workers.allreduce import (
    MIN_SEGMENT_BUCKET_ELEMENTS,
    AllReduceSetup,
    Topology,
    backend_unavailable_reason,
    chunk_bounds,
    ordered_sum,
    owned_slots,
    segment_plan,
    tree_cover,
    tree_sum,
)
from workers.config import ALLREDUCE_BUCKET_BYTES, ALLREDUCE_SHM_SHARE
from workers.errors import AllReduceTimeoutError, SharedMemoryTooSmallError
from workers.group import WorkerGroup

pytestmark = pytest.mark.usefixtures("ray_session")


def fold(rows: list[np.ndarray]) -> np.ndarray:
    """The reference, in NumPy: the first half's sum plus the second half's, down to
    single rows."""
    if len(rows) == 1:
        return rows[0].copy()
    mid = len(rows) // 2
    return fold(rows[:mid]) + fold(rows[mid:])


def test_ordered_sum_adds_along_the_halving_tree(rng: np.random.Generator) -> None:
    scales = 10.0 ** rng.integers(-6, 6, 1000)
    for count in (1, 2, 3, 8, 9):
        rows = (rng.standard_normal((count, 1000)) * scales).astype(np.float32)
        out = ordered_sum(rows, np.empty(1000, np.float32))
        assert np.array_equal(out, fold(list(rows)))
    rows = (rng.standard_normal((8, 1000)) * scales).astype(np.float32)
    by_hand = ((rows[0] + rows[1]) + (rows[2] + rows[3])) + (
        (rows[4] + rows[5]) + (rows[6] + rows[7])
    )
    assert np.array_equal(ordered_sum(rows, np.empty(1000, np.float32)), by_hand)


def test_partial_sums_of_whole_subtrees_give_the_same_bits(rng: np.random.Generator) -> None:
    """What a rank or a node may add up before sending: for any number of ranks, the
    sums of each rank's cover, finished along the tree, equal the sum of all rows."""
    rows = (rng.standard_normal((8, 500)) * 10.0 ** rng.integers(-6, 6, 500)).astype(np.float32)
    expected = fold(list(rows))
    for world in range(1, 10):
        parts = {}
        for rank in range(world):
            for a, b in tree_cover(owned_slots(rank, world, 8), 8):
                parts[a, b] = fold(list(rows[a:b]))
        assert np.array_equal(tree_sum(parts, 8, np.empty(500, np.float32)), expected)


def test_a_power_of_two_of_ranks_each_hold_one_subtree() -> None:
    for world in (1, 2, 4, 8):
        for rank in range(world):
            assert len(tree_cover(owned_slots(rank, world, 8), 8)) == 1
    assert tree_cover(owned_slots(1, 3, 8), 8) == [(2, 4), (4, 5)]
    assert tree_cover([0, 1, 4, 5], 8) == [(0, 2), (4, 6)]  # two ranks' runs on one node
    assert tree_cover([], 8) == []


def test_chunk_bounds_cover_everything_even_with_more_parts_than_elements() -> None:
    assert chunk_bounds(10, 3) == [0, 3, 6, 10]
    assert chunk_bounds(2, 4) == [0, 0, 1, 1, 2]
    assert chunk_bounds(0, 2) == [0, 0, 0]


def test_each_rank_owns_a_contiguous_run_of_slots() -> None:
    assert [list(owned_slots(r, 3, 8)) for r in range(3)] == [[0, 1], [2, 3, 4], [5, 6, 7]]
    assert [list(owned_slots(r, 4, 2)) for r in range(4)] == [[], [0], [], [1]]


def test_topology_groups_ranks_by_node() -> None:
    topology = Topology.from_node_ids(["b", "a", "b", "c"])
    assert topology.node_of_rank == (0, 1, 0, 2)
    assert topology.num_nodes == 3
    assert topology.local_ranks(0) == [0, 2]
    assert [topology.is_leader(r) for r in range(4)] == [True, True, False, True]


def test_unknown_backend_is_explained() -> None:
    assert "unknown" in str(backend_unavailable_reason("mpi"))
    assert backend_unavailable_reason("ray") is None


# --- real all-reduces between Ray actors -----------------------------------------------


def join(
    group: WorkerGroup,
    backend: str,
    *,
    num_slots: int,
    vector_size: int,
    dtype: str = "float32",
    bucket_bytes: int = 4096,
    node_ids: list[str] | None = None,
    timeout_s: float = 30.0,
    resident_max_bytes: int = 0,
    leader_link: str | None = None,
    shm_free_bytes: int | None = None,
) -> None:
    """Set up ``group``'s probes with their own all-reduce (``node_ids`` may pretend
    that ranks on this machine live on different nodes)."""
    setup = AllReduceSetup(
        backend=backend,
        node_ids=tuple(node_ids or [info.node_id for info in group.infos]),
        name=f"test-{uuid.uuid4().hex[:10]}",
        num_slots=num_slots,
        bucket_bytes=bucket_bytes,
        timeout_s=timeout_s,
        resident_max_bytes=resident_max_bytes,
        leader_link=leader_link,
        shm_free_bytes=shm_free_bytes,
    )
    group.join_allreduce(setup, vector_size=vector_size, dtype=dtype)


def check_reduce(
    group: WorkerGroup,
    rng: np.random.Generator,
    *,
    num_slots: int,
    n: int,
    dtype: str = "float32",
    ordered: bool = True,
) -> None:
    world = group.num_workers
    # Magnitudes spread over many decades, so a different order would change the bits.
    slots = [
        (rng.standard_normal(n) * 10.0 ** rng.integers(-8, 8, n)).astype(dtype)
        for _ in range(num_slots)
    ]
    refs = [
        actor.reduce.remote(
            np.stack([slots[s] for s in owned_slots(rank, world, num_slots)]), num_slots, ordered
        )
        for rank, actor in enumerate(group.actors)
    ]
    results = group.gather(refs)
    expected = fold(slots)
    for result in results:
        assert result.dtype == np.dtype(dtype)
        if ordered:
            assert np.array_equal(result, expected)
        else:  # any order: within the rounding bound of a float sum of num_slots terms
            bound = num_slots * np.finfo(dtype).eps * np.abs(np.asarray(slots, np.float64)).sum(0)
            assert np.all(np.abs(result.astype(np.float64) - expected) <= bound)
    for result in results[1:]:
        assert np.array_equal(result, results[0])


@pytest.mark.parametrize(
    ("backend", "world"),
    [("ray", 2), ("ray", 3), ("ray", 4), available("gloo", 2), available("gloo", 3)],
)
def test_allreduce_sums_slots_in_slot_order(
    backend: str, world: int, rng: np.random.Generator
) -> None:
    with WorkerGroup.start(world, worker_cls=ReduceProbe) as group:
        # 12 bytes: three float32 elements per bucket, fewer than the workers.
        for bucket_bytes in (12, 4096):
            join(group, backend, num_slots=8, vector_size=2001, bucket_bytes=bucket_bytes)
            for n in (1, 7, 2001):
                check_reduce(group, rng, num_slots=8, n=n)
            check_reduce(group, rng, num_slots=world, n=999)
            check_reduce(group, rng, num_slots=world + 1, n=5)
        join(group, backend, num_slots=world, vector_size=513, dtype="float64")
        check_reduce(group, rng, num_slots=world, n=513, dtype="float64")
        check_reduce(group, rng, num_slots=world, n=513, dtype="float64", ordered=False)


@pytest.mark.parametrize("node_ids", [["a", "b", "a", "b"], ["a", "a", "b"], ["a", "b"]])
@pytest.mark.parametrize("leader_link", ["ray", available("gloo")])
def test_leaders_reduce_across_nodes_in_slot_order(
    node_ids: list[str], leader_link: str, rng: np.random.Generator
) -> None:
    with WorkerGroup.start(len(node_ids), worker_cls=ReduceProbe) as group:
        for bucket_bytes in (8, 1 << 16):
            # 8-byte buckets: two elements each, one leader round trip per bucket, so
            # their vectors stay short (37 elements, 19 buckets).
            n = 3001 if bucket_bytes > 8 else 37
            join(
                group,
                "ray",
                num_slots=8,
                vector_size=3001,
                bucket_bytes=bucket_bytes,
                node_ids=node_ids,
                leader_link=leader_link,
            )
            check_reduce(group, rng, num_slots=8, n=n)
            check_reduce(group, rng, num_slots=len(node_ids), n=5)
            check_reduce(group, rng, num_slots=len(node_ids), n=n, ordered=False)


@pytest.mark.parametrize(
    ("leader_link", "node_ids"),
    [
        ("ray", ["a", "a"]),
        ("ray", ["a", "a", "a"]),
        ("ray", ["a", "a", "a", "a"]),
        ("ray", ["a", "b", "a"]),
        available("gloo", ["a", "b", "a"]),
    ],
)
def test_resident_rows_are_summed_in_place_in_slot_order(
    leader_link: str, node_ids: list[str], rng: np.random.Generator
) -> None:
    world, n = len(node_ids), 70_001  # more than one summing block per rank
    with WorkerGroup.start(world, worker_cls=ReduceProbe) as group:
        for num_slots in (8, world):
            join(
                group,
                "ray",
                num_slots=num_slots,
                vector_size=n,
                node_ids=node_ids,
                resident_max_bytes=1 << 30,
                leader_link=leader_link,
            )
            slots = [
                (rng.standard_normal(n) * 10.0 ** rng.integers(-8, 8, n)).astype(np.float32)
                for _ in range(num_slots)
            ]
            # A rank may hand in its subtrees' sums instead of its slots' rows.
            spans = group.execute("presum_spans", num_slots)
            assert spans == [
                tree_cover(owned_slots(r, world, num_slots), num_slots) for r in range(world)
            ]
            for poisoned, presummed in itertools.product((False, True), (False, True)):
                if poisoned:
                    slots[-1][n // 2] = np.nan
                refs = [
                    actor.reduce_resident.remote(
                        np.stack([slots[s] for s in owned_slots(rank, world, num_slots)]),
                        num_slots,
                        presummed,
                    )
                    for rank, actor in enumerate(group.actors)
                ]
                expected = fold(slots)
                for result, finite in group.gather(refs):
                    assert finite is not poisoned
                    assert np.array_equal(result, expected, equal_nan=True)


def test_the_segment_plan_fits_the_free_shared_memory() -> None:
    def plan(free: int | None, vector_size: int = 1_000_000) -> tuple[bool, int]:
        setup = AllReduceSetup(
            backend="ray", node_ids=("a", "a"), name="plan", num_slots=8, shm_free_bytes=free
        )
        return segment_plan(setup, vector_size=vector_size, itemsize=4, shared_rows=2)

    # 8 slot rows, the result and 2 shared rows, after two cache lines of counters
    whole = 2 * 64 + 11 * 1_000_000 * 4
    assert plan(None) == (True, 1_000_000)
    assert plan(int(whole / ALLREDUCE_SHM_SHARE)) == (True, 1_000_000)
    assert not plan(int((whole - 4) / ALLREDUCE_SHM_SHARE))[0]
    resident, bucket = plan(64 << 20)  # Docker's default /dev/shm
    assert not resident
    # The largest bucket whose segment (two sets of 9 rows, after the counters) fits.
    allowed = (64 << 20) * ALLREDUCE_SHM_SHARE
    assert 2 * 64 + 2 * 9 * bucket * 4 <= allowed < 2 * 64 + 2 * 9 * (bucket + 1) * 4
    assert MIN_SEGMENT_BUCKET_ELEMENTS <= bucket <= ALLREDUCE_BUCKET_BYTES // 4
    with pytest.raises(SharedMemoryTooSmallError, match=r"/dev/shm has 0\.5 MiB free.*shm-size"):
        plan(512 << 10)


def test_the_segment_fits_the_free_shared_memory_and_sums_the_same(
    rng: np.random.Generator,
) -> None:
    n, free = 70_001, 4 << 20  # whole rows would take 2.5 MB, more than half of 4 MiB
    with WorkerGroup.start(2, worker_cls=ReduceProbe) as group:
        seen = group.shm_free_bytes()
        assert seen is not None and seen > 0  # this machine's /dev/shm, both ranks on it
        join(
            group,
            "ray",
            num_slots=8,
            vector_size=n,
            resident_max_bytes=1 << 30,
            shm_free_bytes=free,
        )
        for resident, size in group.execute("segment"):
            assert not resident and size <= free * ALLREDUCE_SHM_SHARE
        check_reduce(group, rng, num_slots=8, n=n)


def test_a_missing_peer_times_out_with_a_typed_error() -> None:
    with WorkerGroup.start(2, worker_cls=ReduceProbe) as group:
        join(group, "ray", num_slots=2, vector_size=4, timeout_s=0.5)
        rows = np.ones((1, 4), np.float32)
        with pytest.raises(AllReduceTimeoutError, match="did not reach"):
            ray.get(group.actors[0].reduce.remote(rows, 2))


def test_waiting_at_the_barrier_does_not_burn_the_cpu() -> None:
    with WorkerGroup.start(2, worker_cls=ReduceProbe) as group:
        join(group, "ray", num_slots=2, vector_size=4, timeout_s=2.0)
        outcome, cpu_s = ray.get(group.actors[0].reduce_alone.remote(np.ones((1, 4)), 2))
    assert outcome == "AllReduceTimeoutError"
    # Two seconds of waiting; a spinning waiter would use about two seconds of CPU.
    assert cpu_s < 0.5
