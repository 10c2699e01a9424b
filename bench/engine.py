"""Training throughput of trainq's NumPy engine against PyTorch eager on the CPU.

Run by hand (not a test)::

    .venv/bin/python bench/engine.py [--threads N] [--rounds R] [--only mlp|cnn]

(``env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE`` in front lets OpenBLAS pick its
kernel for this CPU; the header names the kernel that runs.)

Both frameworks run full training steps (forward, loss, backward, optimizer
step) of the same model on the same random batch, on the same number of
threads: ``threadpoolctl`` limits NumPy's BLAS and ``torch.set_num_threads``
PyTorch. trainq runs through its real step, ``core.Trainer.train_step``.

Each round times a block of steps of one framework and then of the other (the
order alternates), each block after untimed warm-up steps and after a pause
that waits (``--wait`` seconds at most) for other processes to leave the CPUs
idle. A block is *disturbed* when other processes (or, on a VM, other
machines) took more than 5% of the CPUs while it ran, as /proc/stat tells;
rounds go on until ``--rounds`` rounds ran undisturbed (``--max-rounds`` at
most). The table gives each framework's best undisturbed block and the ratio
of the two; the median of the undisturbed rounds' ratios is printed beside it,
so that neither a lucky nor an unlucky round decides it.

GFLOP/s counts 3 x the forward FLOPs per sample (the forward pass, and the
backward pass's two products) from ``core.summarize(...).flops``, against a
float32 matmul peak measured here with NumPy on the same threads (the best of
several measurements spread over the run).

For the MLP, whose step is mostly matrix products, the report also times those
products alone in each framework (same shapes, same threads, each in the forms
its own step uses): how fast NumPy's BLAS and PyTorch's multiply these shapes
bounds the ratio before any of trainq's own work counts.

Each framework's minor page faults per step are printed too: an array allocated
anew every step can come back from ``malloc`` as fresh pages, which the OS zeroes
on first touch, a cost that shows in neither framework's code.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from threadpoolctl import threadpool_info, threadpool_limits  # noqa: E402

import core  # noqa: E402
from core.spec import TrainingSpec  # noqa: E402

BATCH = 128
CLASSES = 10
#: Pause before each timed block: after a block of one framework its worker threads
#: keep spinning for a while (OpenBLAS's for about 0.1 s, OpenMP's less), and on a
#: machine with few cores they would take CPU time from the other framework.
SETTLE_S = 0.3
#: Timed blocks run, and those disturbed by other processes.
BLOCKS = [0, 0]

MLP_SPEC: dict[str, Any] = {
    "layers": [
        {"type": "dense", "units": 1024},
        {"type": "relu"},
        {"type": "dense", "units": 1024},
        {"type": "relu"},
        {"type": "dense", "units": CLASSES},
    ],
    "loss": "softmax_cross_entropy",
}

CNN_SPEC: dict[str, Any] = {
    "layers": [
        {"type": "conv2d", "filters": 6, "kernel_size": 5, "padding": 2},
        {"type": "relu"},
        {"type": "maxpool2d", "pool_size": 2},
        {"type": "conv2d", "filters": 16, "kernel_size": 5},
        {"type": "relu"},
        {"type": "maxpool2d", "pool_size": 2},
        {"type": "flatten"},
        {"type": "dense", "units": 120},
        {"type": "relu"},
        {"type": "dense", "units": 84},
        {"type": "relu"},
        {"type": "dense", "units": CLASSES},
    ],
    "loss": "softmax_cross_entropy",
}

#: Not among the issue's targets: the kind of CNN a user writes today (3x3 convolutions
#: with batch normalisation, strided instead of pooled, global average pooling).
CONVNET_SPEC: dict[str, Any] = {
    "layers": [
        {"type": "conv2d", "filters": 16, "kernel_size": 3, "padding": 1},
        {"type": "batchnorm"},
        {"type": "relu"},
        {"type": "conv2d", "filters": 32, "kernel_size": 3, "padding": 1, "stride": 2},
        {"type": "batchnorm"},
        {"type": "relu"},
        {"type": "conv2d", "filters": 64, "kernel_size": 3, "padding": 1, "stride": 2},
        {"type": "batchnorm"},
        {"type": "relu"},
        {"type": "global_avgpool"},
        {"type": "dense", "units": CLASSES},
    ],
    "loss": "softmax_cross_entropy",
}


@dataclass(frozen=True)
class Case:
    key: str
    name: str
    spec: dict[str, Any]
    input_shape: tuple[int, ...]
    optimizer: dict[str, Any]
    target_ratio: float | None  # trainq / PyTorch, or None
    target_peak: float | None  # fraction of the matmul peak, or None
    steps: int  # timed steps per block


CASES = (
    Case(
        "mlp",
        "MLP 784-1024-1024-10, SGD momentum",
        MLP_SPEC,
        (784,),
        {"type": "sgd", "lr": 0.01, "momentum": 0.9},
        1.2,
        0.70,
        10,
    ),
    Case(
        "cnn",
        "LeNet-5 CNN 1x28x28, Adam",
        CNN_SPEC,
        (1, 28, 28),
        {"type": "adam", "lr": 1e-3},
        1.0,
        None,
        15,
    ),
    Case(
        "convnet",
        "3x3 CNN with batchnorm 1x28x28, Adam",
        CONVNET_SPEC,
        (1, 28, 28),
        {"type": "adam", "lr": 1e-3},
        None,
        None,
        5,
    ),
)


# --- the two frameworks ---------------------------------------------------------------


def trainq_trainer(case: Case, device: str = "cpu", batch: int = BATCH) -> core.Trainer:
    return core.Trainer(
        model_spec=case.spec,
        optimizer_spec=case.optimizer,
        training=TrainingSpec(batch_size=batch, seed=0),
        input_shape=case.input_shape,
        num_classes=CLASSES,
        device=device,
    )


def trainq_step(trainer: core.Trainer, x: np.ndarray, y: np.ndarray) -> Callable[[], None]:
    def step() -> None:
        trainer.train_step(x, y, steps_per_epoch=1000, total_steps=100_000)

    return step


def torch_model(case: Case) -> Any:
    from torch import nn

    if case.key == "mlp":
        return nn.Sequential(
            nn.Linear(784, 1024),
            nn.ReLU(),
            nn.Linear(1024, 1024),
            nn.ReLU(),
            nn.Linear(1024, CLASSES),
        )
    if case.key == "convnet":
        return nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, stride=2),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1, stride=2),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(64, CLASSES),
        )
    return nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 5 * 5, 120),
        nn.ReLU(),
        nn.Linear(120, 84),
        nn.ReLU(),
        nn.Linear(84, CLASSES),
    )


def torch_step(case: Case, x: np.ndarray, y: np.ndarray, where: str = "cpu") -> Callable[[], None]:
    """One PyTorch training step of ``case`` on ``x, y``, on the torch device ``where``."""
    import torch

    torch.manual_seed(0)
    model = torch_model(case).to(where)
    opt: torch.optim.Optimizer
    if case.optimizer["type"] == "sgd":
        opt = torch.optim.SGD(
            model.parameters(), lr=case.optimizer["lr"], momentum=case.optimizer["momentum"]
        )
    else:
        opt = torch.optim.Adam(model.parameters(), lr=case.optimizer["lr"])
    loss_fn = torch.nn.CrossEntropyLoss()
    tx, ty = torch.from_numpy(x).to(where), torch.from_numpy(y).to(where)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(tx), ty)
        loss.backward()
        opt.step()

    return step


# --- timing ----------------------------------------------------------------------------


def _cpu_times() -> tuple[float, float] | None:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat (busy
    includes time the hypervisor gave to other machines); None where there is none."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + fields[4]
    tick = os.sysconf("SC_CLK_TCK")
    return (sum(fields) - idle) / tick, sum(fields) / tick


def _own_cpu() -> float:
    """CPU seconds used by this process, all its threads."""
    times = os.times()
    return times.user + times.system


def settle(max_wait_s: float) -> bool:
    """Pause at least ``SETTLE_S``, and until other processes leave the CPUs idle (busy
    under 10% for ``SETTLE_S``), for at most ``max_wait_s``; whether it got quiet."""
    deadline = time.monotonic() + max_wait_s
    while True:
        before = _cpu_times()
        time.sleep(SETTLE_S)
        after = _cpu_times()
        if before is None or after is None:
            return True
        busy, total = after[0] - before[0], after[1] - before[1]
        if total <= 0 or busy <= 0.1 * total:
            return True
        if time.monotonic() > deadline:
            return False


class Block(NamedTuple):
    """One timed block of steps."""

    rate: float  # samples per second
    quiet: bool  # undisturbed by other processes
    faults: float  # minor page faults per step: fresh pages the OS zeroes on first touch


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def timed(step: Callable[[], None], steps: int, warmup: int, wait_s: float) -> Block:
    """Samples per second over ``steps`` steps, after a pause and ``warmup`` untimed steps,
    whether the block ran undisturbed (quiet before, and other processes, or other
    machines on the host, took under 5% of the CPUs meanwhile), and its page faults."""
    quiet = settle(wait_s)
    for _ in range(warmup):
        step()
    machine, own, faults = _cpu_times(), _own_cpu(), _minor_faults()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    elapsed = time.perf_counter() - start
    faults = _minor_faults() - faults
    after = _cpu_times()
    if machine is not None and after is not None:
        others = (after[0] - machine[0]) - (_own_cpu() - own)
        capacity = elapsed * (os.cpu_count() or 1)
        quiet = quiet and others <= max(0.05 * capacity, 0.02)
    return Block(steps * BATCH / elapsed, quiet, faults / steps)


def matmul_peak(n: int = 2048, repeats: int = 7) -> float:
    """GFLOP/s of an n x n float32 matmul with NumPy (best of ``repeats``)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    out = np.empty((n, n), dtype=np.float32)
    np.matmul(a, b, out=out)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.matmul(a, b, out=out)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def products_alone(trainer: core.Trainer) -> tuple[Callable[[], None], Callable[[], None]] | None:
    """One step's matrix products alone, with NumPy and with PyTorch, each in the forms its
    own step multiplies (each timed like a step, in the same rounds), for a model whose
    weights are all dense layers' (None otherwise). Ours, W (in, out): ``x @ W``,
    ``x.T @ dy`` and ``dy @ W.T``; PyTorch's, W (out, in) as ``nn.Linear`` keeps it:
    ``x @ W.T`` (with the bias, as ``addmm``), ``dy.T @ x`` and ``dy @ W``. The first
    layer takes no ``dx`` in either. A step can be no faster than its products."""
    import torch

    layers = [layer for layer in trainer.model.layers if layer.params]
    if not layers or any(layer.type != "dense" for layer in layers):
        return None
    rng = np.random.default_rng(0)

    def normal(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape, dtype=np.float32)

    ours: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # a, b, out: out = a @ b
    theirs: list[tuple[Any, Any, Any, Any]] = []  # bias or None, a, b, out
    for i, layer in enumerate(layers):
        fan_in, units = layer.params["W"].shape
        x, dy, w = normal(BATCH, fan_in), normal(BATCH, units), normal(fan_in, units)
        ours.append((x, w, np.empty((BATCH, units), np.float32)))
        ours.append((x.T, dy, np.empty((fan_in, units), np.float32)))
        tx, tdy = torch.from_numpy(x), torch.from_numpy(dy)
        tw = torch.from_numpy(np.ascontiguousarray(w.T))  # (units, fan_in)
        theirs.append((torch.zeros(units), tx, tw.t(), torch.empty(BATCH, units)))
        theirs.append((None, tdy.t(), tx, torch.empty(units, fan_in)))
        if i:
            ours.append((dy, w.T, np.empty((BATCH, fan_in), np.float32)))
            theirs.append((None, tdy, tw, torch.empty(BATCH, fan_in)))

    def numpy_products() -> None:
        for a, b, out in ours:
            np.matmul(a, b, out=out)

    def torch_products() -> None:
        for bias, a, b, out in theirs:
            if bias is None:
                torch.mm(a, b, out=out)
            else:
                torch.addmm(bias, a, b, out=out)

    return numpy_products, torch_products


def bookkeeping(
    trainer: core.Trainer, x: np.ndarray, y: np.ndarray, steps: int
) -> tuple[float, float]:
    """What the Trainer's per-layer gradient norms (taken in every ``apply_gradients``)
    add to a step, in ms, and the step's best time: steps with and without them
    (``record=False``), blocks of each taking turns, the best of each subtracted. (Timed
    alone, over and over, the norms read the gradients from memory; in a step the
    backward has just written them, and they are still in cache.)"""

    def step(record: bool) -> None:  # as train_step, on one thread
        trainer.model.zero_grad()
        trainer.compute_gradients(x, y)
        trainer.apply_gradients(
            steps_per_epoch=1000, total_steps=100_000, diagnose=False, record=record
        )

    best = {True: float("inf"), False: float("inf")}
    for block in range(10):
        for record in (True, False) if block % 2 == 0 else (False, True):
            start = time.perf_counter()
            for _ in range(steps):
                step(record)
            best[record] = min(best[record], (time.perf_counter() - start) / steps)
    return (best[True] - best[False]) * 1e3, best[True] * 1e3


@dataclass
class Result:
    case: Case
    trainq: float  # samples/s, best round
    torch: float
    ratio: float  # trainq / torch, best undisturbed blocks
    ratios: list[float]  # per undisturbed round
    gflops: float
    peak_share: float
    norms_ms: float
    step_ms: float
    products_ms: tuple[float, float] | None  # best of NumPy, PyTorch: see products_alone
    faults: tuple[float, float]  # page faults per step, trainq's and PyTorch's (medians)
    rounds: int
    clean_rounds: int  # rounds whose two blocks ran undisturbed

    @property
    def median_ratio(self) -> float:
        return statistics.median(self.ratios)


def _best(blocks: list[Block]) -> float:
    """The best samples/s of the undisturbed blocks (of every block, if none was)."""
    return max([b.rate for b in blocks if b.quiet] or [b.rate for b in blocks])


def run_case(
    case: Case, rounds: int, max_rounds: int, warmup: int, wait_s: float, peaks: list[float]
) -> Result:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((BATCH, *case.input_shape), dtype=np.float32)
    y = rng.integers(0, CLASSES, BATCH).astype(np.int64)
    trainer = trainq_trainer(case)
    ours, theirs = trainq_step(trainer, x, y), torch_step(case, x, y)
    products = products_alone(trainer)
    products_runs: list[list[Block]] = [[], []]  # NumPy's, PyTorch's
    runs: list[tuple[Block, Block]] = []  # trainq's, PyTorch's
    while sum(a.quiet and b.quiet for a, b in runs) < rounds and len(runs) < max_rounds:
        if len(runs) % 2 == 0:
            a = timed(ours, case.steps, warmup, wait_s)
            b = timed(theirs, case.steps, warmup, wait_s)
        else:
            b = timed(theirs, case.steps, warmup, wait_s)
            a = timed(ours, case.steps, warmup, wait_s)
        runs.append((a, b))
        if products is not None:
            for fn, blocks in zip(products, products_runs, strict=True):
                blocks.append(timed(fn, case.steps, warmup, wait_s))
        if len(runs) % 3 == 1:  # the peak too is measured in several rounds
            settle(wait_s)
            peaks.append(matmul_peak())
    clean = [(a.rate, b.rate) for a, b in runs if a.quiet and b.quiet]
    BLOCKS[0] += 2 * len(runs)
    BLOCKS[1] += sum((not a.quiet) + (not b.quiet) for a, b in runs)

    best_ours = _best([a for a, _ in runs])
    best_theirs = _best([b for _, b in runs])
    flops = core.summarize(case.spec, case.input_shape, CLASSES).flops
    gflops = 3 * flops * best_ours / 1e9
    settle(wait_s)
    norms_ms, step_ms = bookkeeping(trainer, x, y, case.steps)
    products_ms = None
    if products is not None:
        products_ms = (1e3 * BATCH / _best(products_runs[0]), 1e3 * BATCH / _best(products_runs[1]))
    return Result(
        case=case,
        trainq=best_ours,
        torch=best_theirs,
        ratio=best_ours / best_theirs,
        ratios=[a / b for a, b in (clean or [(a.rate, b.rate) for a, b in runs])],
        gflops=gflops,
        peak_share=gflops / max(peaks),
        norms_ms=norms_ms,
        step_ms=step_ms,
        products_ms=products_ms,
        faults=(
            statistics.median(a.faults for a, _ in runs),
            statistics.median(b.faults for _, b in runs),
        ),
        rounds=len(runs),
        clean_rounds=len(clean),
    )


# --- report ----------------------------------------------------------------------------


def blas_description() -> str:
    for info in threadpool_info():
        if info.get("user_api") == "blas":
            return (
                f"{info.get('internal_api')} {info.get('version')}, "
                f"kernel {info.get('architecture')}, {info.get('num_threads')} threads"
            )
    return "unknown BLAS"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def table(results: list[Result], peak: float, threads: int) -> list[str]:
    rows = [
        f"| model ({threads} thread{'s' if threads != 1 else ''}) | trainq samples/s "
        "| PyTorch samples/s | trainq / PyTorch (median of rounds) | target "
        "| trainq GFLOP/s | of matmul peak | target |",
        "|---|---:|---:|---:|---|---:|---:|---|",
    ]
    for r in results:
        c = r.case
        if c.target_ratio is None:
            ratio_target = "-"
        else:
            ok = "pass" if r.ratio >= c.target_ratio else "MISS"
            ratio_target = f">= {c.target_ratio:.1f}x: {ok}"
        if c.target_peak is None:
            peak_target = "-"
        else:
            ok = "pass" if r.peak_share >= c.target_peak else "MISS"
            peak_target = f">= {c.target_peak:.0%}: {ok}"
        rows.append(
            f"| {c.name} | {r.trainq:,.0f} | {r.torch:,.0f} | "
            f"{r.ratio:.2f}x ({r.median_ratio:.2f}x) | {ratio_target} | "
            f"{r.gflops:.0f} | {r.peak_share:.0%} | {peak_target} |"
        )
    rows.append(f"| float32 matmul peak, NumPy 2048x2048 | | | | | {peak:.0f} | 100% | |")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--rounds", type=int, default=12, help="undisturbed timed rounds wanted per model"
    )
    parser.add_argument("--max-rounds", type=int, default=40, help="timed rounds at most")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before each block")
    parser.add_argument("--only", choices=[c.key for c in CASES], help="run one model")
    parser.add_argument(
        "--wait",
        type=float,
        default=20.0,
        help="seconds each block may wait for other processes to leave the CPUs idle",
    )
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    with threadpool_limits(limits=args.threads):
        env = {k: os.environ.get(k, "(unset)") for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
        print(f"machine: {cpu_name()}, {os.cpu_count()} cores; threads: {args.threads}")
        print(f"NumPy {np.__version__} ({blas_description()}); PyTorch {torch.__version__}")
        print("environment: " + ", ".join(f"{k}={v}" for k, v in env.items()))
        print(f"load average before: {os.getloadavg()[0]:.2f}")
        print(f"batch {BATCH}; best undisturbed round of each framework")
        settle(args.wait)
        peaks = [matmul_peak()]
        results = []
        for case in CASES:
            if args.only and case.key != args.only:
                continue
            result = run_case(case, args.rounds, args.max_rounds, args.warmup, args.wait, peaks)
            results.append(result)
            rounds = " ".join(f"{q:.2f}" for q in result.ratios)
            print(
                f"{case.name}: {result.clean_rounds} of {result.rounds} rounds undisturbed; "
                f"their ratios {rounds}",
                flush=True,
            )
        print(f"load average after: {os.getloadavg()[0]:.2f}")
        if BLOCKS[1]:
            print(
                f"{BLOCKS[1]} of {BLOCKS[0]} timed blocks were disturbed by other processes "
                "and left out (unless no block of a framework was undisturbed)"
            )
        peak = max(peaks)
        for r in results:  # against the best peak seen over the whole run
            r.peak_share = r.gflops / peak
        print()
        print("\n".join(table(results, peak, args.threads)))
        print()
        for r in results:
            print(
                f"{r.case.name}: the Trainer's per-layer gradient norms add "
                f"{r.norms_ms:.2f} ms to a {r.step_ms:.2f} ms step ({r.norms_ms / r.step_ms:.1%}; "
                "steps with and without them taking turns)"
            )
        for r in results:
            ours_faults, theirs_faults = r.faults
            print(
                f"{r.case.name}: minor page faults a step (fresh pages, zeroed by the OS on "
                f"first touch; medians of the blocks): trainq {ours_faults:.0f}, "
                f"PyTorch {theirs_faults:.0f}"
            )
        for r in results:
            if r.products_ms is not None:
                ours_ms, theirs_ms = r.products_ms
                print(
                    f"{r.case.name}: its matrix products alone take {ours_ms:.2f} ms with "
                    f"NumPy and {theirs_ms:.2f} ms with PyTorch; PyTorch's whole step takes "
                    f"{1e3 * BATCH / r.torch:.2f} ms, so trainq / PyTorch can reach at most "
                    f"{BATCH / r.torch * 1e3 / ours_ms:.2f}x here"
                )
        missed = [
            r
            for r in results
            if (r.case.target_ratio is not None and r.ratio < r.case.target_ratio)
            or (r.case.target_peak is not None and r.peak_share < r.case.target_peak)
        ]
        print("all targets met" if not missed else f"{len(missed)} model(s) missed a target")
    if args.only is None:
        # The transformer's side-by-side run (tokens/s), in bench/transformer.py.
        import transformer

        print()
        transformer.main(["--threads", str(args.threads)])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
