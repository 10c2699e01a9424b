"""The ``trainq`` command line."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import TextIO

from core import DatasetUnavailable, SpecError, fit, load_dataset, parse_job_spec, summarize

BAR_WIDTH = 30


class ProgressBar:
    """One line per epoch that fills as batches finish (redrawn in place on a terminal)."""

    def __init__(self, *, epochs: int, steps_per_epoch: int, stream: TextIO = sys.stderr) -> None:
        self.epochs = epochs
        self.steps_per_epoch = steps_per_epoch
        self.stream = stream
        self.live = stream.isatty()
        self.epoch = 1
        self.started = time.perf_counter()

    def step(self, step: int, loss: float) -> None:
        if not self.live:
            return
        done = (step - 1) % self.steps_per_epoch + 1
        filled = BAR_WIDTH * done // self.steps_per_epoch
        bar = "#" * filled + "-" * (BAR_WIDTH - filled)
        self.stream.write(
            f"\repoch {self.epoch}/{self.epochs} [{bar}] {done}/{self.steps_per_epoch} "
            f"loss {loss:.4f}"
        )
        self.stream.flush()

    def epoch_done(self, epoch: int, metrics: dict[str, float]) -> None:
        shown = ["train_loss", "train_accuracy", "val_loss", "val_accuracy", "samples_per_s"]
        parts = [f"{name} {metrics[name]:.4g}" for name in shown if name in metrics]
        prefix = "\r" if self.live else ""
        bar = "#" * BAR_WIDTH
        self.stream.write(
            f"{prefix}epoch {epoch}/{self.epochs} [{bar}] " + "  ".join(parts) + "\033[K\n"
            if self.live
            else f"epoch {epoch}/{self.epochs}  " + "  ".join(parts) + "\n"
        )
        self.stream.flush()
        self.epoch = epoch + 1


def _train(args: argparse.Namespace) -> int:
    job = parse_job_spec(json.loads(Path(args.file).read_text()))
    if args.epochs is not None:
        job = job.model_copy(
            update={"training": job.training.model_copy(update={"epochs": args.epochs})}
        )
    dataset = load_dataset(job.dataset.name)
    print(summarize(job.model, dataset.input_shape, dataset.num_classes))
    n_train = len(dataset.X) - int(round(len(dataset.X) * job.training.validation_split))
    bar = ProgressBar(
        epochs=job.training.epochs, steps_per_epoch=math.ceil(n_train / job.training.batch_size)
    )
    result = fit(job, dataset, on_step=bar.step, on_epoch=bar.epoch_done)
    for name, value in result.test.items():
        print(f"{name} {value:.4f}")
    if args.save:
        Path(args.save).write_bytes(result.trainer.save())
        print(f"saved {args.save}")
    return 0


def _summary(args: argparse.Namespace) -> int:
    job = parse_job_spec(json.loads(Path(args.file).read_text()))
    dataset = load_dataset(job.dataset.name)
    print(summarize(job.model, dataset.input_shape, dataset.num_classes))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trainq", description="trainq: train neural networks")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a job spec in this process")
    train.add_argument("file", help="job spec (JSON)")
    train.add_argument("--epochs", type=int, help="override training.epochs")
    train.add_argument("--save", help="write the final state (.npz) here")
    train.set_defaults(run=_train)
    summary = commands.add_parser("summary", help="layers, shapes, parameters and FLOPs of a job")
    summary.add_argument("file", help="job spec (JSON)")
    summary.set_defaults(run=_summary)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except (SpecError, DatasetUnavailable, KeyError, OSError, json.JSONDecodeError) as exc:
        print(f"trainq: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
