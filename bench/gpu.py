"""Training throughput of trainq on a GPU (CuPy) against PyTorch eager on the same GPU.

Run by hand (not a test), on a machine with CUDA, CuPy and a CUDA build of PyTorch::

    python bench/gpu.py [--batches 128 1024] [--rounds R] [--steps S]

The models are those of ``bench/engine.py`` (the MLP with SGD, the LeNet-5 CNN and the 3x3 CNN
with Adam), run as full training steps through ``Trainer.train_step`` with
``device="gpu"``, and as the same PyTorch models on ``cuda``. Each round times a
block of steps of one framework and then of the other (the order alternates);
a block ends with both devices synchronised. The table gives the median samples/s
over the rounds and the median of the rounds' ratios. GFLOP/s counts 3 x the
forward FLOPs per sample, against a 4096x4096 float32 matmul with CuPy.

``--device cpu`` runs the same script with NumPy and PyTorch on the CPU (a check
of the script itself on a machine without a GPU).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine import CASES, CLASSES, Case, torch_step, trainq_step, trainq_trainer  # noqa: E402

import core  # noqa: E402
from core.backend import get_xp  # noqa: E402


def _sync(device: str) -> None:
    """Wait for the work queued on the GPU by either framework."""
    if device == "gpu":
        import torch

        get_xp("gpu").cuda.Device().synchronize()
        torch.cuda.synchronize()


def timed(step: Callable[[], None], steps: int, warmup: int, device: str, batch: int) -> float:
    """Samples per second over ``steps`` steps, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return steps * batch / (time.perf_counter() - start)


def matmul_peak(device: str, n: int = 4096, repeats: int = 10) -> float:
    """GFLOP/s of an n x n float32 matmul with the engine's array module."""
    xp = get_xp(device)
    a = xp.asarray(np.random.default_rng(0).standard_normal((n, n), dtype=np.float32))
    out = xp.empty_like(a)
    xp.matmul(a, a, out=out)
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        xp.matmul(a, a, out=out)
    _sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def run(case: Case, batch: int, device: str, rounds: int, steps: int, warmup: int) -> list[str]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, *case.input_shape), dtype=np.float32)
    y = rng.integers(0, CLASSES, batch).astype(np.int64)
    trainer = trainq_trainer(case, device=device, batch=batch)
    xp = trainer.model.xp  # the batch on the device once, as PyTorch's
    ours = trainq_step(trainer, xp.asarray(x), xp.asarray(y))
    theirs = torch_step(case, x, y, where="cuda" if device == "gpu" else "cpu")
    a_runs: list[float] = []
    b_runs: list[float] = []
    for r in range(rounds):
        pair = [(ours, a_runs), (theirs, b_runs)]
        for step, runs in pair if r % 2 == 0 else pair[::-1]:
            runs.append(timed(step, steps, warmup, device, batch))
    ratios = [a / b for a, b in zip(a_runs, b_runs, strict=True)]
    flops = core.summarize(case.spec, case.input_shape, CLASSES).flops
    a, b = statistics.median(a_runs), statistics.median(b_runs)
    return [
        case.name,
        str(batch),
        f"{a:,.0f}",
        f"{b:,.0f}",
        f"{statistics.median(ratios):.2f}x",
        f"{3 * flops * a / 1e9:,.0f}",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--device", choices=["gpu", "cpu"], default="gpu")
    parser.add_argument("--batches", type=int, nargs="+", default=[128, 1024])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per block")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before each block")
    args = parser.parse_args(argv)

    import torch

    xp = get_xp(args.device)
    if args.device == "gpu":
        print(f"{torch.cuda.get_device_name()}; CuPy {xp.__version__}; PyTorch {torch.__version__}")
    else:
        print(f"CPU; NumPy {np.__version__}; PyTorch {torch.__version__}")
    peak = matmul_peak(args.device)
    rows = [
        "| model | batch | trainq samples/s | PyTorch samples/s | trainq / PyTorch "
        "| trainq GFLOP/s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for case in CASES:
        for batch in args.batches:
            cells = run(case, batch, args.device, args.rounds, args.steps, args.warmup)
            rows.append("| " + " | ".join(cells) + " |")
            print(rows[-1], flush=True)
    print()
    print("\n".join(rows))
    print(f"float32 matmul peak ({args.device}, 4096x4096): {peak:,.0f} GFLOP/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
