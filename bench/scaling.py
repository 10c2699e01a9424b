"""Data-parallel throughput: 1 worker against 2, and against PyTorch DDP over gloo.

    python bench/scaling.py [--batches 128 512] [--steps 20] [--threads 1]

The model is the MLP 784-1024-1024-10 with Adam, on random data. Every worker
(and every PyTorch process) gets ``--threads`` BLAS threads, so 2 workers use
twice the cores of one. trainq runs its real training step
(``workers.worker.TrainWorker.train_step``) in a Ray worker group, in
deterministic mode (8 micro-shards summed in order) and in fast mode (one
forward/backward per worker); PyTorch runs one process, and DDP two processes
over gloo. Timed: ``--steps`` steps after three warm-up steps; samples/s of the
global batch. Printed: throughput, the share of the step spent in the
all-reduce, and the ratios 2 workers / 1 worker and trainq / DDP.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import statistics
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import ray

from workers.group import WorkerGroup
from workers.trainer import steps_per_call
from workers.worker import TrainWorker

FEATURES, HIDDEN, CLASSES = 784, 1024, 10
WARMUP_STEPS = 3
MLP = {
    "layers": [
        {"type": "dense", "units": HIDDEN},
        {"type": "relu"},
        {"type": "dense", "units": HIDDEN},
        {"type": "relu"},
        {"type": "dense", "units": CLASSES},
    ],
    "loss": "softmax_cross_entropy",
}


def job(batch: int) -> dict[str, Any]:
    return {
        "name": "bench-scaling",
        "dataset": {"name": "random"},
        "model": MLP,
        "optimizer": {"type": "adam", "lr": 1e-3},
        "training": {"epochs": 1, "batch_size": batch, "validation_split": 0.0, "seed": 0},
    }


def data(batch: int, steps: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    n = batch * (steps + WARMUP_STEPS)
    return rng.random((n, FEATURES), np.float32), rng.integers(0, CLASSES, n)


class BenchWorker(TrainWorker):
    """The training worker with its BLAS threads set from outside."""

    def set_threads(self, threads: int) -> None:
        from threadpoolctl import threadpool_limits

        self._limits = threadpool_limits(limits=threads)


def trainq(workers: int, batch: int, steps: int, threads: int, deterministic: bool) -> dict:
    X, y = data(batch, steps)
    refs = {
        "X_train": ray.put(X),
        "y_train": ray.put(y),
        "X_val": ray.put(X[:0]),
        "y_val": ray.put(y[:0]),
    }
    with WorkerGroup.start(workers, worker_cls=BenchWorker, num_cpus_per_worker=threads) as group:
        group.execute("set_threads", threads)
        group.execute(
            "setup_job",
            job(batch),
            refs,
            input_shape=(FEATURES,),
            num_classes=CLASSES,
            deterministic=deterministic,
            micro_shards=8,
        )
        group.setup_allreduce("ray", num_slots=8 if deterministic else workers)
        warmup = group.execute("train_steps", 0, list(range(WARMUP_STEPS)))[0]
        # As run_job does: a few steps per call (steps_per_call), and the next call
        # made before the last one is answered.
        per_call = steps_per_call(warmup[-1].seconds)
        timed = list(range(WARMUP_STEPS, WARMUP_STEPS + steps))
        started = time.perf_counter()
        in_flight = [
            group.submit("train_steps", 0, timed[i : i + per_call])
            for i in range(0, steps, per_call)
        ]
        allreduce = sum(r.allreduce_time_s for refs in in_flight for r in group.gather(refs)[0])
        elapsed = time.perf_counter() - started
    return {"samples_per_s": batch * steps / elapsed, "allreduce_share": allreduce / elapsed}


def torch_model() -> Any:
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(FEATURES, HIDDEN),
        torch.nn.ReLU(),
        torch.nn.Linear(HIDDEN, HIDDEN),
        torch.nn.ReLU(),
        torch.nn.Linear(HIDDEN, CLASSES),
    )


def torch_steps(model: Any, X: np.ndarray, y: np.ndarray, batch: int, steps: int) -> float:
    """Seconds for ``steps`` steps (after warm-up) on batches of ``batch`` rows."""
    import torch

    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    started = 0.0
    for i in range(WARMUP_STEPS + steps):
        if i == WARMUP_STEPS:
            started = time.perf_counter()
        xb, yb = Xt[i * batch : (i + 1) * batch], yt[i * batch : (i + 1) * batch]
        optimizer.zero_grad()
        loss_fn(model(xb), yb).backward()
        optimizer.step()
    return time.perf_counter() - started


def torch_single(batch: int, steps: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    X, y = data(batch, steps)
    elapsed = torch_steps(torch_model(), X, y, batch, steps)
    return {"samples_per_s": batch * steps / elapsed, "allreduce_share": 0.0}


def _ddp_rank(rank: int, world: int, port: int, batch: int, steps: int, threads: int, out: Any):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    model = torch.nn.parallel.DistributedDataParallel(torch_model())
    X, y = data(batch, steps)
    local = batch // world
    # Each rank takes its part of every global batch.
    parts = np.concatenate(
        [
            np.arange(s * batch + rank * local, s * batch + (rank + 1) * local)
            for s in range(WARMUP_STEPS + steps)
        ]
    )
    dist.barrier()
    elapsed = torch_steps(model, X[parts], y[parts], local, steps)
    if rank == 0:
        out.put(elapsed)
    dist.destroy_process_group()


def torch_ddp(world: int, batch: int, steps: int, threads: int) -> dict:
    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    context = mp.get_context("spawn")
    out = context.Queue()
    processes = [
        context.Process(target=_ddp_rank, args=(r, world, port, batch, steps, threads, out))
        for r in range(world)
    ]
    for p in processes:
        p.start()
    elapsed = out.get(timeout=600)
    for p in processes:
        p.join()
    return {"samples_per_s": batch * steps / elapsed, "allreduce_share": float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="BLAS threads per worker")
    args = parser.parse_args()
    ray.init(
        address="local",
        num_cpus=max(2 * args.threads, os.cpu_count() or 2),
        include_dashboard=False,
        logging_level=logging.ERROR,
        log_to_driver=False,
    )
    steps, threads = args.steps, args.threads
    print(
        f"MLP 784-1024-1024-10, Adam, {threads} thread(s) per worker, {steps} timed steps, "
        f"median of {args.rounds} rounds"
    )
    print(f"{'batch':>5}  {'configuration':<34} {'samples/s':>10} {'all-reduce':>10}")
    for batch in args.batches:
        configurations: dict[str, Callable[[], dict]] = {
            "trainq 1 worker, deterministic": partial(trainq, 1, batch, steps, threads, True),
            "trainq 1 worker, fast": partial(trainq, 1, batch, steps, threads, False),
            "trainq 2 workers, deterministic": partial(trainq, 2, batch, steps, threads, True),
            "trainq 2 workers, fast": partial(trainq, 2, batch, steps, threads, False),
            "pytorch 1 process": partial(torch_single, batch, steps, threads),
            "pytorch DDP 2 processes (gloo)": partial(torch_ddp, 2, batch, steps, threads),
        }
        runs: dict[str, list[dict]] = {name: [] for name in configurations}
        names = list(configurations)
        for round_index in range(args.rounds):
            # Alternate the order, so a burst of load elsewhere does not hit one configuration.
            for name in names if round_index % 2 == 0 else names[::-1]:
                runs[name].append(configurations[name]())
        speed = {}
        for name, rows in runs.items():
            speed[name] = statistics.median(row["samples_per_s"] for row in rows)
            share = statistics.median(row["allreduce_share"] for row in rows)
            share_text = "" if share != share else f"{share:>9.0%}"
            print(f"{batch:>5}  {name:<34} {speed[name]:>10.0f} {share_text:>10}")
        ddp = speed["pytorch DDP 2 processes (gloo)"]
        for mode in ("deterministic", "fast"):
            two = speed[f"trainq 2 workers, {mode}"]
            print(
                f"{batch:>5}  {mode}: 2 workers / 1 worker "
                f"{two / speed[f'trainq 1 worker, {mode}']:.2f}, 2 workers / DDP {two / ddp:.2f}"
            )
        single = speed["pytorch 1 process"]
        print(f"{batch:>5}  DDP 2 processes / pytorch 1 process {ddp / single:.2f}")
    ray.shutdown()


if __name__ == "__main__":
    main()
