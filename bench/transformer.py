"""Training throughput of a character transformer: trainq's NumPy engine against PyTorch eager.

Run by hand (not a test)::

    .venv/bin/python bench/transformer.py [--threads N] [--rounds R] [--profile]

The model is the one of the language-model test: token embedding, learned
positions, two pre-norm causal transformer blocks (width 64, 4 heads, MLP 256,
exact GELU), a final layernorm and a dense layer to the vocabulary; batch 32,
context 64, AdamW, per-token cross-entropy, on windows of ``tiny_corpus``.
PyTorch runs the same architecture with ``scaled_dot_product_attention``.

Both frameworks run full training steps (forward, loss, backward, optimizer step)
on the same batch and the same number of threads (``threadpoolctl`` limits NumPy's
BLAS, ``torch.set_num_threads`` limits PyTorch). Each round times a block of steps
of one framework, then of the other (the order alternates between rounds), after
untimed warm-up steps; tokens/s are the median over the rounds and the ratio is
the median of the per-round ratios, so a burst of load from another process does
not decide it. With more than one thread, trainq also runs with each batch split
over the threads (``Trainer(threads=N)``), in the same rounds. ``--profile`` adds
trainq's forward and backward time per layer.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from threadpoolctl import threadpool_limits  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine import blas_description, cpu_name  # noqa: E402

import core  # noqa: E402
from core.spec import TrainingSpec  # noqa: E402

BATCH = 32
CONTEXT = 64
DIM = 64
HEADS = 4
BLOCKS = 2
MLP_RATIO = 4
OPTIMIZER: dict[str, Any] = {"type": "adamw", "lr": 1e-3}
TARGET_RATIO = 0.8


def model_spec(vocab: int) -> dict:
    return {
        "layers": [
            {"type": "embedding", "vocab_size": vocab, "dim": DIM},
            {"type": "positional_embedding", "max_len": CONTEXT},
            *[{"type": "transformer_block", "heads": HEADS} for _ in range(BLOCKS)],
            {"type": "layernorm"},
            {"type": "dense", "units": vocab},
        ],
        "loss": "softmax_cross_entropy",
    }


def batch_of_text() -> tuple[np.ndarray, np.ndarray, int]:
    data = core.load_dataset("tiny_corpus")
    order = np.random.default_rng(0).permutation(len(data.X))[:BATCH]
    assert data.num_classes is not None
    return data.X[order], data.y[order], data.num_classes


# --- the two frameworks ---------------------------------------------------------------


def trainq_step(x: np.ndarray, y: np.ndarray, vocab: int, threads: int = 1) -> Callable[[], None]:
    trainer = core.Trainer(
        model_spec=model_spec(vocab),
        optimizer_spec=OPTIMIZER,
        training=TrainingSpec(batch_size=BATCH, seed=0),
        input_shape=(CONTEXT,),
        num_classes=vocab,
        threads=threads,
    )

    def step() -> None:
        trainer.train_step(x, y, steps_per_epoch=1000, total_steps=100_000)

    step.trainer = trainer  # type: ignore[attr-defined]
    return step


def torch_model(vocab: int):
    import torch
    from torch import nn
    from torch.nn import functional as F

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
            self.qkv, self.out = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM)
            self.mlp1, self.mlp2 = nn.Linear(DIM, MLP_RATIO * DIM), nn.Linear(MLP_RATIO * DIM, DIM)

        def forward(self, x):
            batch, time_, dim = x.shape
            qkv = self.qkv(self.ln1(x)).view(batch, time_, 3, HEADS, dim // HEADS)
            q, k, v = qkv.permute(2, 0, 3, 1, 4)
            mixed = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.out(mixed.transpose(1, 2).reshape(batch, time_, dim))
            return x + self.mlp2(F.gelu(self.mlp1(self.ln2(x))))

    class CharTransformer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(vocab, DIM)
            self.positions = nn.Parameter(torch.randn(CONTEXT, DIM) * 0.02)
            self.blocks = nn.Sequential(*[Block() for _ in range(BLOCKS)])
            self.ln = nn.LayerNorm(DIM)
            self.head = nn.Linear(DIM, vocab)

        def forward(self, ids):
            h = self.embed(ids) + self.positions[: ids.shape[1]]
            return self.head(self.ln(self.blocks(h)))

    return CharTransformer()


def torch_step(x: np.ndarray, y: np.ndarray, vocab: int) -> Callable[[], None]:
    import torch

    torch.manual_seed(0)
    model = torch_model(vocab)
    opt = torch.optim.AdamW(model.parameters(), lr=OPTIMIZER["lr"], weight_decay=0.01)
    tx, ty = torch.from_numpy(x), torch.from_numpy(y).reshape(-1)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        logits = model(tx)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), ty)
        loss.backward()
        opt.step()

    return step


# --- timing ----------------------------------------------------------------------------


def timed(step: Callable[[], None], steps: int, warmup: int) -> float:
    """Tokens per second over ``steps`` steps, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * BATCH * CONTEXT / (time.perf_counter() - start)


def layer_profile(step: Callable[[], None], steps: int) -> list[tuple[str, float, float]]:
    """Milliseconds per step of each layer's forward and backward, and of the rest."""
    model = step.trainer.model  # type: ignore[attr-defined]
    spent: dict[tuple[int, str], float] = defaultdict(float)
    originals = []
    for index, layer in enumerate(model.layers):
        for phase in ("forward", "backward"):
            original = getattr(layer, phase)
            originals.append((layer, phase, original))

            def clocked(*args, _index=index, _phase=phase, _original=original):
                start = time.perf_counter()
                out = _original(*args)
                spent[(_index, _phase)] += time.perf_counter() - start
                return out

            setattr(layer, phase, clocked)
    try:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        total = time.perf_counter() - start
    finally:
        for layer, phase, _ in originals:
            delattr(layer, phase)
    rows = [
        (
            f"{index}.{layer.type}",
            spent[(index, "forward")] / steps * 1e3,
            spent[(index, "backward")] / steps * 1e3,
        )
        for index, layer in enumerate(model.layers)
    ]
    rest = total / steps * 1e3 - sum(f + b for _, f, b in rows)
    return [*rows, ("loss, optimizer, bookkeeping", rest, 0.0)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before each block")
    parser.add_argument("--profile", action="store_true", help="trainq time per layer")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    with threadpool_limits(limits=args.threads):
        print(f"machine: {cpu_name()}, {os.cpu_count()} cores; threads: {args.threads}")
        print(f"NumPy {np.__version__} ({blas_description()}); PyTorch {torch.__version__}")
        x, y, vocab = batch_of_text()
        print(
            f"char transformer: {BLOCKS} blocks, width {DIM}, {HEADS} heads, context {CONTEXT}, "
            f"vocab {vocab}, batch {BATCH}, AdamW; {args.rounds} rounds of {args.steps} steps"
        )
        # trainq as it trains by default, and (with more than one thread) with each batch
        # split over the threads (Trainer(threads=N)), each product on one BLAS thread.
        steps = {"trainq": trainq_step(x, y, vocab)}
        if args.threads > 1:
            steps[f"trainq, batch split over {args.threads} threads"] = trainq_step(
                x, y, vocab, threads=args.threads
            )
        steps["PyTorch"] = torch_step(x, y, vocab)
        speeds: dict[str, list[float]] = {name: [] for name in steps}
        names = list(steps)
        for r in range(args.rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:  # turns rotate
                speeds[name].append(timed(steps[name], args.steps, args.warmup))
        torch_runs = speeds.pop("PyTorch")
        rows = []
        for name, runs in speeds.items():
            ratios = [a / b for a, b in zip(runs, torch_runs, strict=True)]
            print(f"{name}: per-round ratios " + " ".join(f"{q:.2f}" for q in ratios))
            ratio = statistics.median(ratios)
            verdict = "pass" if ratio >= TARGET_RATIO else "MISS"
            rows.append(
                f"| char transformer{name.removeprefix('trainq')} | "
                f"{statistics.median(runs):,.0f} | {statistics.median(torch_runs):,.0f} | "
                f"{ratio:.2f}x | >= {TARGET_RATIO:.1f}x: {verdict} |"
            )
        print()
        print("| model | trainq tokens/s | PyTorch tokens/s | trainq / PyTorch | target |")
        print("|---|---:|---:|---:|---|")
        print("\n".join(rows))
        ours = steps["trainq"]
        if args.profile:
            print()
            print("| trainq layer | forward ms | backward ms |")
            print("|---|---:|---:|")
            for name, forward, backward in layer_profile(ours, args.steps):
                print(f"| {name} | {forward:.2f} | {backward:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
