"""All-reduce time and bus bandwidth: the ``ray`` backend against ``gloo``.

    python bench/allreduce.py [--sizes-mb 1 4 16 64] [--workers 2 4] [--repeats 10]

For each buffer size and number of workers, every backend reduces a float32
buffer ``--repeats`` times after two warm-up rounds, in two modes:
``slots=N`` (one contribution per worker; gloo uses its own all-reduce) and
``slots=8`` (deterministic mode: eight micro-shard contributions summed in
order). Reported: the median time of rank 0, the algorithm bandwidth
``size / time`` and the bus bandwidth ``algbw * 2 (N - 1) / N`` (the NCCL-tests
convention, comparable across worker counts), and the ratio gloo / ray.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time
import uuid
from typing import Any

import numpy as np
import ray

from workers.allreduce import AllReduceSetup, backend_unavailable_reason, make_allreduce
from workers.group import WorkerGroup

MB = 1024 * 1024
DETERMINISTIC_SLOTS = 8


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
        rows_count = len(range(self.rank, num_slots, self.world_size))
        rows = np.random.default_rng(self.rank).standard_normal((rows_count, n), np.float32)
        out = np.empty(n, np.float32)
        times = []
        for i in range(repeats + 2):
            started = time.perf_counter()
            self.backend.reduce(rows, num_slots, out, ordered=ordered)
            if i >= 2:
                times.append(time.perf_counter() - started)
        return times


def join(group: WorkerGroup, backend: str, num_slots: int, n: int) -> None:
    setup = AllReduceSetup(
        backend=backend,
        node_ids=tuple(info.node_id for info in group.infos),
        name=f"bench-{uuid.uuid4().hex[:10]}",
        num_slots=num_slots,
    )
    for phase in ("create", "attach", "seal"):
        group.execute("setup_allreduce", setup, phase, None, vector_size=n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--workers", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    backends = ["ray"] + (["gloo"] if backend_unavailable_reason("gloo") is None else [])
    if "gloo" not in backends:
        print(f"gloo skipped: {backend_unavailable_reason('gloo')}")
    ray.init(
        address="local",
        num_cpus=max(args.workers) * 2,
        include_dashboard=False,
        logging_level=logging.ERROR,
        log_to_driver=False,
    )
    print(f"{os.cpu_count()} CPU cores; float32 buffers; median of {args.repeats}")
    print(
        f"{'workers':>7} {'MB':>4} {'slots':>5} {'backend':>7} {'ms':>9} "
        f"{'algbw GB/s':>10} {'busbw GB/s':>10} {'gloo/ray':>8}"
    )
    for world in args.workers:
        for backend_times in _measure(world, args.sizes_mb, args.repeats, backends):
            print(backend_times)
    ray.shutdown()


def _measure(world: int, sizes_mb: list[int], repeats: int, backends: list[str]) -> list[str]:
    lines = []
    results: dict[tuple[int, str, str], float] = {}
    for backend in backends:
        # A fresh group per backend: a gloo process group is set up once per process.
        with WorkerGroup.start(world, worker_cls=ReduceBenchWorker) as group:
            for size_mb in sizes_mb:
                n = size_mb * MB // 4
                for num_slots, ordered in ((world, False), (DETERMINISTIC_SLOTS, True)):
                    join(group, backend, num_slots, n)
                    times = group.execute("time_reduce", n, num_slots, ordered, repeats)[0]
                    label = str(num_slots) if ordered else "N"
                    results[(size_mb, label, backend)] = statistics.median(times)
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
