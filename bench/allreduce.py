"""All-reduce time and bus bandwidth: the ``ray`` backend against ``gloo``.

    python bench/allreduce.py [--sizes-mb 1 4 16 64] [--workers 2 4] [--repeats 10] [--nodes 2]

For each buffer size and number of workers, every backend reduces a float32
buffer in two modes: ``slots=N`` (one contribution per worker; gloo uses its
own all-reduce) and ``slots=8`` (deterministic mode: eight micro-shard
contributions summed in order). Each backend has its own worker group, and the
groups take turns: a turn times ``--repeats`` reduces after five warm-up
rounds, four turns per backend, so that both backends meet the same spells of
load from other processes. Reported: the median time of rank 0 over all turns,
the algorithm bandwidth ``size / time`` and the bus bandwidth
``algbw * 2 (N - 1) / N`` (the NCCL-tests convention, comparable across worker
counts), and the ratio gloo / ray. The ``ray`` backend is timed as training
uses it: the rows already lie in shared memory, where a worker's backward wrote
them, and the sum is read where it was made; gloo copies each rank's rows in
and the sum out.

``--nodes 2`` starts a two-node Ray cluster on this machine
(``ray.cluster_utils.Cluster``) and places the first half of the ranks on one
node and the rest on the other, as a ``PACK`` placement group does: the
``ray`` backend then reduces within each node through shared memory and between
the two node leaders over gloo (through Ray's object store without torch), the
``gloo`` backend over TCP between all ranks.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import socket
import statistics
import time
import uuid
from typing import Any

import numpy as np
import ray
from ray.cluster_utils import Cluster

from workers.allreduce import (
    AllReduceSetup,
    backend_unavailable_reason,
    make_allreduce,
    owned_slots,
)
from workers.group import WorkerGroup

MB = 1024 * 1024
DETERMINISTIC_SLOTS = 8
#: Untimed rounds before each timed set.
WARMUP_ROUNDS = 5
#: Timed sets per backend and case, the backends taking turns, so that both see the
#: same spells of load from other processes (two Ray nodes share this machine's cores).
TURNS = 4
#: Pause after a group starts, before its first timing, so that Ray's own start-up
#: work (worker processes) is not timed with it.
SETTLE_S = 2.0


class ReduceBenchWorker:
    """One rank that times all-reduces of a buffer it fills itself."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank = rank
        self.world_size = world_size
        self.backend: Any = None

    def info(self) -> Any:
        from workers.worker import TrainWorker

        return TrainWorker(self.rank, self.world_size).info()

    def ping(self) -> int:
        return os.getpid()

    def setup_allreduce(
        self, setup: AllReduceSetup, phase: str, exchange: Any = None, *, vector_size: int = 1
    ) -> None:
        if phase == "create":
            if self.backend is not None:
                self.backend.close()
            self.backend = make_allreduce(
                setup, rank=self.rank, vector_size=vector_size, dtype="float32", exchange=exchange
            )
        elif phase == "attach":
            self.backend.attach()
        else:
            self.backend.seal()

    def time_reduce(self, n: int, num_slots: int, ordered: bool, repeats: int) -> list[float]:
        rows_count = len(owned_slots(self.rank, self.world_size, num_slots))
        rows = np.random.default_rng(self.rank).standard_normal((rows_count, n), np.float32)
        out = np.empty(n, np.float32)
        resident = self.backend.resident_views()
        if resident is not None:  # as a training worker: its backward writes the rows there
            for view, row in zip(resident[0], rows, strict=True):
                view[...] = row
        times = []
        for i in range(repeats + WARMUP_ROUNDS):
            started = time.perf_counter()
            if resident is not None:
                self.backend.reduce_resident(num_slots, ordered=ordered)
            else:
                self.backend.reduce(rows, num_slots, out, ordered=ordered)
            if i >= WARMUP_ROUNDS:
                times.append(time.perf_counter() - started)
        return times


def join(group: WorkerGroup, backend: str, num_slots: int, n: int) -> None:
    setup = AllReduceSetup(
        backend=backend,
        node_ids=tuple(info.node_id for info in group.infos),
        name=f"bench-{uuid.uuid4().hex[:10]}",
        num_slots=num_slots,
        shm_free_bytes=group.shm_free_bytes(),
    )
    group.join_allreduce(setup, vector_size=n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--workers", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--nodes", type=int, choices=(1, 2), default=1)
    args = parser.parse_args()
    backends = ["ray"] + (["gloo"] if backend_unavailable_reason("gloo") is None else [])
    if "gloo" not in backends:
        print(f"gloo skipped: {backend_unavailable_reason('gloo')}")
    cluster = None
    if args.nodes == 1:
        ray.init(
            address="local",
            num_cpus=max(args.workers) * 2,
            include_dashboard=False,
            logging_level=logging.ERROR,
            log_to_driver=False,
        )
    else:
        cluster = two_node_cluster(max(args.workers))
        ray.init(address=cluster.address, logging_level=logging.ERROR, log_to_driver=False)
    print(
        f"{os.cpu_count()} CPU cores; {args.nodes} Ray node(s); float32 buffers; "
        f"median of {TURNS} turns x {args.repeats} per backend"
    )
    print(
        f"{'workers':>7} {'MB':>4} {'slots':>5} {'backend':>7} {'ms':>9} "
        f"{'algbw GB/s':>10} {'busbw GB/s':>10} {'gloo/ray':>8}"
    )
    for world in args.workers:
        for line in _measure(world, args.sizes_mb, args.repeats, backends, args.nodes):
            print(line)
    ray.shutdown()
    if cluster is not None:
        cluster.shutdown()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def two_node_cluster(workers: int) -> Cluster:
    """A head and a second node on this machine, each with a resource that pins ranks."""
    store = 2 * (64 + 8) * MB * workers
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            # Ray's default port (6379) may be taken by a Redis server.
            "gcs_server_port": free_port(),
            "num_cpus": workers,
            "resources": {"node_a": workers},
            "include_dashboard": False,
            "object_store_memory": store,
        },
    )
    cluster.add_node(num_cpus=workers, resources={"node_b": workers}, object_store_memory=store)
    return cluster


def _measure(
    world: int, sizes_mb: list[int], repeats: int, backends: list[str], nodes: int
) -> list[str]:
    lines = []
    results: dict[tuple[int, str, str], float] = {}
    placement: dict[str, Any] = {}
    if nodes == 2:  # half the ranks on each node, in rank order
        placement["resources_per_worker"] = [
            {"node_a" if rank < world // 2 else "node_b": 1} for rank in range(world)
        ]
    with contextlib.ExitStack() as stack:
        # A group per backend, all alive at once: a process joins one gloo world only
        # (torch.distributed's default group), and the backends take turns.
        groups = {
            backend: stack.enter_context(
                WorkerGroup.start(world, worker_cls=ReduceBenchWorker, **placement)
            )
            for backend in backends
        }
        time.sleep(SETTLE_S)
        for size_mb in sizes_mb:
            n = size_mb * MB // 4
            for num_slots, ordered in ((world, False), (DETERMINISTIC_SLOTS, True)):
                for backend, group in groups.items():
                    join(group, backend, num_slots, n)
                times: dict[str, list[float]] = {backend: [] for backend in backends}
                for turn in range(TURNS):
                    # Alternate which backend goes first, so that neither always runs
                    # just after the other has left the CPUs busy.
                    ordering = backends if turn % 2 == 0 else backends[::-1]
                    for backend in ordering:
                        per_rank = groups[backend].execute(
                            "time_reduce", n, num_slots, ordered, repeats
                        )
                        times[backend].extend(per_rank[0])
                label = str(num_slots) if ordered else "N"
                for backend in backends:
                    results[(size_mb, label, backend)] = statistics.median(times[backend])
    order = sorted(results, key=lambda key: (key[0], key[1], backends.index(key[2])))
    for size_mb, slots, backend in order:
        seconds = results[(size_mb, slots, backend)]
        algbw = size_mb * MB / seconds / 1e9
        busbw = algbw * 2 * (world - 1) / world
        ratio = ""
        if backend == "gloo":
            ratio = f"{seconds / results[(size_mb, slots, 'ray')]:8.2f}"
        lines.append(
            f"{world:>7} {size_mb:>4} {slots:>5} {backend:>7} {seconds * 1e3:>9.2f} "
            f"{algbw:>10.2f} {busbw:>10.2f} {ratio:>8}"
        )
    return lines


if __name__ == "__main__":
    main()
