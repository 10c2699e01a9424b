"""Training: the step every worker runs, and a single-process ``fit()``."""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

import numpy as np
from threadpoolctl import ThreadpoolController

from core.backend import to_numpy
from core.checkpoint import decode_json, encode_json, from_npz_bytes, split_prefix, to_npz_bytes
from core.data import Dataset, batch_slices, epoch_order, load_dataset, split_indices
from core.layers.base import GroupTree
from core.losses import correct_count, loss
from core.model import Model, build_model
from core.optim import Optimizer, build_optimizer, clip_grad_norm, scheduled_lr
from core.spec import JobSpec, ModelSpec, TrainingSpec, parse_job_spec

EVAL_BATCH_SIZE = 1024

Metrics = dict[str, float]


@dataclass
class BatchStats:
    """Sums over the samples of one or more batches."""

    loss_sum: float = 0.0
    samples: int = 0
    correct: int = 0
    predicted: int = 0

    def add(self, other: BatchStats) -> None:
        self.loss_sum += other.loss_sum
        self.samples += other.samples
        self.correct += other.correct
        self.predicted += other.predicted

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / max(self.samples, 1)

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.predicted if self.predicted else None


@dataclass
class _Diagnostics:
    """Per-layer gradient norms (averaged over an epoch) and update ratios (last step)."""

    grad_norm_sums: dict[str, float] = field(default_factory=dict)
    steps: int = 0
    update_ratios: dict[str, float] = field(default_factory=dict)


class Trainer:
    """A model, its optimizer, and the position in training.

    ``compute_gradients`` and ``apply_gradients`` are the two halves of a step,
    so data-parallel workers can all-reduce in between; ``train_step`` does both.

    With ``threads`` above 1, ``train_step`` splits a batch into that many parts
    (:meth:`parts_for`), each part's forward and backward on a thread of its own with
    a copy of the model that shares its parameters, every product on one BLAS thread:
    the elementwise work, which NumPy runs on one core, then runs on all, and each
    core keeps its part's activations in its own cache. Each part's gradients are
    computed alone and then added in part order, so a step computes the same numbers
    every time for a given number of threads, though not those of one thread. It pays
    where the work is long elementwise passes (the char transformer of
    ``bench/transformer.py``: 1.3x faster on 2 cores); a model of many short calls
    (LeNet) gains nothing, as the threads take turns at the interpreter, and large
    dense layers lose (a second set of weight gradients to add).
    BLAS runs on one thread for the whole step; the process's setting is restored after.
    """

    def __init__(
        self,
        *,
        model_spec: ModelSpec | dict[str, Any],
        optimizer_spec: Any,
        training: TrainingSpec,
        input_shape: tuple[int, ...],
        num_classes: int | None,
        dtype: str = "float32",
        device: str = "cpu",
        dataset_meta: dict[str, Any] | None = None,
        threads: int = 1,
    ) -> None:
        if threads < 1:
            raise ValueError(f"threads must be at least 1, got {threads}")
        self.training = training
        self.threads = threads
        #: What prediction needs to know of the training data (a text model's vocabulary),
        #: saved with the model as JSON.
        self.dataset_meta: dict[str, Any] = dict(dataset_meta or {})
        #: Builds the model, and the copies that run the other parts of a split batch.
        self._build_model = functools.partial(
            build_model,
            model_spec,
            input_shape,
            seed=training.seed,
            dtype=dtype,
            device=device,
            num_classes=num_classes,
        )
        self.model: Model = self._build_model()
        self.optimizer: Optimizer = build_optimizer(optimizer_spec, self.model)
        self.loss_name = self.model.spec.loss
        self.epoch = 0  # epochs completed
        self.step = 0  # optimizer steps taken
        self._layer_params = _params_by_layer(self.model)
        self._diagnostics = _Diagnostics()
        #: Copies of the model for the other parts of a batch split over threads, and
        #: the threads that run them (made on first use).
        self._copies: list[Model] = []
        self._pool: ThreadPoolExecutor | None = None
        model = self.model
        self._splittable = model.xp is np and not any(layer.buffers for layer in model.layers)

    @classmethod
    def for_job(cls, job: JobSpec, dataset: Dataset, **kwargs: Any) -> Trainer:
        return cls(
            model_spec=job.model,
            optimizer_spec=job.optimizer,
            training=job.training,
            input_shape=dataset.input_shape,
            num_classes=dataset.num_classes,
            device=job.resources.device,
            dataset_meta=dataset.meta,
            **kwargs,
        )

    def bind_grads(self, flat: Any) -> None:
        """Gradients, for the model and its optimizer, as views of ``flat`` (see
        :meth:`Model.bind_grads`): data-parallel workers backpropagate into, and step
        from, their all-reduce buffers without copying."""
        self.model.bind_grads(flat)
        self.optimizer.bind(grads=self.model.grad_views(flat))
        self._layer_params = _params_by_layer(self.model)

    def bind_params(self, flat: Any) -> None:
        """Parameters as views of ``flat`` (copied in; see :meth:`Model.bind_params`)."""
        self.model.bind_params(flat)
        self.optimizer.bind(params=self.model.grad_views(flat))
        self._layer_params = _params_by_layer(self.model)

    # --- one step ---------------------------------------------------------------------

    def compute_gradients(
        self, x: Any, y: Any, *, scale: float = 1.0, rng_key: tuple[int, ...] = ()
    ) -> BatchStats:
        """Forward and backward on one batch, adding ``scale`` * its mean-loss gradient."""
        _need_samples(x)
        return self._gradients(self.model, x, y, scale, rng_key)

    def _gradients(
        self, model: Model, x: Any, y: Any, scale: float, rng_key: tuple[int, ...]
    ) -> BatchStats:
        model.set_rng(np.random.default_rng([self.training.seed, 1, self.step, *rng_key]))
        y = model.xp.asarray(y)
        outputs = model.forward(x, training=True)
        stats, doutputs = self._loss(outputs, y, scale)
        model.backward(doutputs)
        return stats

    def compute_group_gradients(
        self,
        x: Any,
        y: Any,
        bounds: Sequence[int],
        grad_rows: Sequence[Any],
        *,
        total: int,
        trees: Sequence[GroupTree] | None = None,
    ) -> list[BatchStats]:
        """:meth:`compute_gradients` of each group of samples ``bounds[i]:bounds[i + 1]``
        of one batch, with scale (its size / ``total``), its gradients written into
        ``grad_rows[i]`` (see :meth:`Model.set_groups`): the same numbers, in one
        forward and backward of the whole batch. With ``trees``, ``grad_rows[i]``
        receives the sum of those of the groups of ``trees[i]``, added along it.
        Only for a :attr:`Model.groupable` model (no layer draws random numbers)."""
        model = self.model
        model.set_groups(bounds, grad_rows, trees)
        try:
            y = model.xp.asarray(y)
            outputs = model.forward(x, training=True)
            doutputs = model.xp.empty_like(outputs)
            stats = []
            for lo, hi in pairwise(bounds):
                group, doutputs[lo:hi] = self._loss(outputs[lo:hi], y[lo:hi], (hi - lo) / total)
                stats.append(group)
            model.backward(doutputs)
        finally:
            model.set_groups(None)
        return stats

    def _loss(self, outputs: Any, y: Any, scale: float) -> tuple[BatchStats, Any]:
        """The batch's statistics, and ``scale`` * the gradient of its mean loss."""
        value, doutputs = loss(self.loss_name, outputs, y)
        if scale != 1.0:
            doutputs *= scale
        right = correct_count(self.loss_name, outputs, y)
        n = len(outputs)
        stats = BatchStats(
            loss_sum=value * n,
            samples=n,
            correct=right[0] if right else 0,
            predicted=right[1] if right else 0,
        )
        return stats, doutputs

    def apply_gradients(
        self,
        *,
        steps_per_epoch: int,
        total_steps: int,
        diagnose: bool,
        update: Callable[[], None] | None = None,
        record: bool = True,
    ) -> None:
        """Clip, schedule, and take the optimizer step on the accumulated gradients.

        ``update`` replaces the optimizer's step (workers that share one copy of the
        parameters each update a part); ``record=False`` skips the gradient norms (a
        replica that does not report them, or one that takes them elsewhere).
        """
        opt = self.optimizer
        opt.lr = scheduled_lr(
            float(opt.spec.lr),
            opt.spec.schedule,
            step=self.step,
            steps_per_epoch=steps_per_epoch,
            total_steps=total_steps,
        )
        diagnostics = self._diagnostics
        if record:
            self.record_grad_norms(
                {
                    layer: sum(squared_norm(g) for _, g in pairs)
                    for layer, pairs in self._layer_params.items()
                }
            )
        diagnostics.steps += 1
        if self.training.grad_clip_norm is not None:
            clip_grad_norm((g for _, _, g in self.model.parameters()), self.training.grad_clip_norm)
        before = (
            {layer: [p.copy() for p, _ in pairs] for layer, pairs in self._layer_params.items()}
            if diagnose
            else None
        )
        (update or opt.step)()
        self.step += 1
        if before is not None:
            for layer, pairs in self._layer_params.items():
                change = sum(
                    float(((p - old) ** 2).sum())
                    for (p, _), old in zip(pairs, before[layer], strict=True)
                )
                size = sum(float((old * old).sum()) for old in before[layer])
                diagnostics.update_ratios[layer] = math.sqrt(change) / max(math.sqrt(size), 1e-12)

    def record_grad_norms(self, squared: dict[str, float]) -> None:
        """Add one step's squared gradient norm of each layer to the epoch's diagnostics
        (:meth:`apply_gradients` does, unless told not to record)."""
        sums = self._diagnostics.grad_norm_sums
        for layer, norm_sq in squared.items():
            sums[layer] = sums.get(layer, 0.0) + math.sqrt(norm_sq)

    def train_step(
        self, x: Any, y: Any, *, steps_per_epoch: int, total_steps: int, diagnose: bool = False
    ) -> BatchStats:
        _need_samples(x)
        self.model.zero_grad()
        parts = self.parts_for(len(x))
        with _one_blas_thread() if parts > 1 else nullcontext():
            if parts == 1:
                stats = self._gradients(self.model, x, y, 1.0, ())
            else:
                stats = self._gradients_in_parts(x, y, parts)
            self.apply_gradients(
                steps_per_epoch=steps_per_epoch, total_steps=total_steps, diagnose=diagnose
            )
        return stats

    def parts_for(self, batch_size: int) -> int:
        """Into how many parts, one per thread, :meth:`train_step` splits a batch of
        ``batch_size``: ``threads``, at most one per sample, where the model allows it
        (NumPy, and no running statistics, which are taken over the whole batch);
        otherwise 1."""
        if self.threads == 1 or not self._splittable:
            return 1
        return max(1, min(self.threads, batch_size))

    def _gradients_in_parts(self, x: Any, y: Any, parts: int) -> BatchStats:
        """:meth:`compute_gradients` of each part of the batch, each on its own thread
        and copy of the model, their gradients added into the model's in part order."""
        models = [self.model, *self._model_copies(parts - 1)]
        for copy in models[1:]:
            for mine, theirs in zip(self.model.layers, copy.layers, strict=True):
                theirs.params.update(mine.params)  # the same arrays, whatever binds them
            copy.zero_grad()
        n = len(x)
        bounds = [n * i // parts for i in range(parts + 1)]
        y = np.asarray(y)

        def part(i: int) -> BatchStats:
            lo, hi = bounds[i], bounds[i + 1]
            return self._gradients(models[i], x[lo:hi], y[lo:hi], (hi - lo) / n, (i,))

        assert self._pool is not None
        others = [self._pool.submit(part, i) for i in range(1, parts)]
        try:
            stats = part(0)
        finally:  # no thread left working on the model when this returns or raises
            wait(others)
        for future in others:
            stats.add(future.result())
        grads = [g for _, _, g in self.model.parameters()]
        for copy in models[1:]:
            for grad, theirs in zip(grads, (g for _, _, g in copy.parameters()), strict=True):
                grad += theirs
        return stats

    def _model_copies(self, count: int) -> list[Model]:
        while len(self._copies) < count:
            self._copies.append(self._build_model())
        if self._pool is None:  # a part never has more than threads - 1 others beside it
            self._pool = ThreadPoolExecutor(self.threads - 1, thread_name_prefix="trainq-part")
        return self._copies[:count]

    # --- epochs -----------------------------------------------------------------

    def begin_epoch(self) -> None:
        """Start an epoch's per-layer diagnostics (for loops that call the two halves of a step)."""
        self._diagnostics = _Diagnostics()

    def epoch_diagnostics(self) -> Metrics:
        """``grad_norm/<layer>`` (mean over the epoch's steps) and ``update_ratio/<layer>``."""
        diagnostics = self._diagnostics
        metrics: Metrics = {}
        for layer, total in diagnostics.grad_norm_sums.items():
            metrics[f"grad_norm/{layer}"] = total / max(diagnostics.steps, 1)
        for layer, ratio in diagnostics.update_ratios.items():
            metrics[f"update_ratio/{layer}"] = ratio
        return metrics

    def train_epoch(
        self,
        X: np.ndarray,
        y: np.ndarray,
        *,
        total_epochs: int,
        on_step: Callable[[int, float], None] | None = None,
    ) -> Metrics:
        """One pass over ``X, y`` in the seeded order of this epoch; returns its metrics."""
        spec = self.training
        order = epoch_order(len(X), spec.seed, self.epoch, spec.shuffle)
        steps_per_epoch = math.ceil(len(X) / spec.batch_size)
        total_steps = steps_per_epoch * total_epochs
        self.begin_epoch()
        stats = BatchStats()
        started = time.perf_counter()
        for i, batch in enumerate(batch_slices(len(X), spec.batch_size)):
            index = order[batch]
            batch_stats = self.train_step(
                X[index],
                y[index],
                steps_per_epoch=steps_per_epoch,
                total_steps=total_steps,
                diagnose=i == steps_per_epoch - 1,
            )
            stats.add(batch_stats)
            if on_step is not None:
                on_step(self.step, batch_stats.mean_loss)
        elapsed = time.perf_counter() - started
        self.epoch += 1
        metrics: Metrics = {
            "train_loss": stats.mean_loss,
            "lr": self.optimizer.lr,
            "samples_per_s": stats.samples / elapsed if elapsed > 0 else 0.0,
            "epoch_time_s": elapsed,
        }
        if stats.accuracy is not None:
            metrics["train_accuracy"] = stats.accuracy
        metrics.update(self.epoch_diagnostics())
        return metrics

    def evaluate(
        self, X: np.ndarray, y: np.ndarray, batch_size: int = EVAL_BATCH_SIZE
    ) -> BatchStats:
        """Mean loss and accuracy in evaluation mode (no dropout, running batchnorm stats)."""
        stats = BatchStats()
        xp = self.model.xp
        for batch in batch_slices(len(X), batch_size):
            outputs = self.model.forward(X[batch], training=False)
            targets = xp.asarray(y[batch])
            value, _ = loss(self.loss_name, outputs, targets)
            right = correct_count(self.loss_name, outputs, targets)
            n = batch.stop - batch.start
            stats.add(
                BatchStats(
                    loss_sum=value * n,
                    samples=n,
                    correct=right[0] if right else 0,
                    predicted=right[1] if right else 0,
                )
            )
        return stats

    def predict(self, X: np.ndarray, batch_size: int = EVAL_BATCH_SIZE) -> np.ndarray:
        batches = list(batch_slices(len(X), batch_size)) or [slice(0, 0)]  # none: no outputs
        outputs = [to_numpy(self.model.forward(X[batch], training=False)) for batch in batches]
        return np.concatenate(outputs)

    # --- state ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, np.ndarray]:
        """Weights, optimizer state, RNG state and position, as arrays; with them, as JSON,
        the model spec and the dataset's metadata (a text model's vocabulary)."""
        state: dict[str, np.ndarray] = {}
        state.update({f"model/{k}": v for k, v in self.model.state_dict().items()})
        state.update({f"optim/{k}": v for k, v in self.optimizer.state_dict().items()})
        state["trainer/epoch"] = np.asarray(self.epoch, dtype=np.int64)
        state["trainer/step"] = np.asarray(self.step, dtype=np.int64)
        state["rng/dropout"] = encode_json(self.model.rng.bit_generator.state)
        state["spec/model"] = encode_json(self.model.spec.model_dump())
        if self.dataset_meta:
            state["dataset/meta"] = encode_json(self.dataset_meta)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(split_prefix(state, "model"))
        self.optimizer.load_state_dict(split_prefix(state, "optim"))
        self.epoch = int(state["trainer/epoch"])
        self.step = int(state["trainer/step"])
        rng = np.random.default_rng()
        rng.bit_generator.state = decode_json(state["rng/dropout"])
        self.model.set_rng(rng)
        if "dataset/meta" in state:
            self.dataset_meta = decode_json(state["dataset/meta"])

    def save(self) -> bytes:
        """The state as ``.npz`` bytes (a checkpoint)."""
        return to_npz_bytes(self.state_dict())

    def load(self, data: bytes) -> None:
        self.load_state_dict(from_npz_bytes(data))


@functools.cache
def _blas_controller() -> ThreadpoolController:
    return ThreadpoolController()


@contextmanager
def _one_blas_thread() -> Iterator[None]:
    """Every BLAS product on one thread (the calling one) while inside."""
    with _blas_controller().limit(limits=1, user_api="blas"):
        yield


def _need_samples(x: Any) -> None:
    if len(x) == 0:
        raise ValueError("a training batch needs at least one sample, got none")


#: Elements of a gradient whose squared norm is one BLAS dot product.
NORM_BLOCK = 1 << 15


def squared_norm(array: Any) -> float:
    """sum(a * a): each block of ``NORM_BLOCK`` elements one dot product (no temporary),
    the blocks summed in order, so that workers that each take some blocks of a
    parameter get the same number."""
    flat = array.reshape(-1)
    return sum(
        float(block @ block)
        for block in (flat[i : i + NORM_BLOCK] for i in range(0, flat.size, NORM_BLOCK))
    )


def _params_by_layer(model: Model) -> dict[str, list[tuple[Any, Any]]]:
    groups: dict[str, list[tuple[Any, Any]]] = {}
    for name, layer in zip(model.layer_names(), model.layers, strict=True):
        if layer.params:
            groups[name] = [(layer.params[k], layer.grads[k]) for k in layer.params]
    return groups


@dataclass
class FitResult:
    trainer: Trainer
    history: list[Metrics]
    test: Metrics

    @property
    def model(self) -> Model:
        return self.trainer.model


def fit(
    job: JobSpec | dict[str, Any],
    dataset: Dataset | None = None,
    *,
    until_epoch: int | None = None,
    resume: bytes | None = None,
    on_epoch: Callable[[int, Metrics], None] | None = None,
    on_step: Callable[[int, float], None] | None = None,
    on_checkpoint: Callable[[int, bytes], None] | None = None,
    threads: int = 1,
) -> FitResult:
    """Train a job's model in this process.

    ``until_epoch`` stops early (to checkpoint and resume later); ``resume`` is
    a checkpoint from :meth:`Trainer.save`. Per-epoch metrics go to ``on_epoch``
    (named as in DESIGN.md), each step's loss to ``on_step``, checkpoints as
    ``.npz`` bytes to ``on_checkpoint``. ``threads`` splits each batch over that
    many threads (see :class:`Trainer`).
    """
    job = parse_job_spec(job)
    dataset = dataset if dataset is not None else load_dataset(job.dataset.name)
    spec = job.training
    trainer = Trainer.for_job(job, dataset, threads=threads)
    if resume is not None:
        trainer.load(resume)
    train_idx, val_idx = split_indices(len(dataset.X), spec.validation_split, spec.seed)
    X_train, y_train = dataset.X[train_idx], dataset.y[train_idx]
    X_val, y_val = dataset.X[val_idx], dataset.y[val_idx]
    last_epoch = spec.epochs if until_epoch is None else min(until_epoch, spec.epochs)
    history: list[Metrics] = []
    while trainer.epoch < last_epoch:
        metrics = trainer.train_epoch(X_train, y_train, total_epochs=spec.epochs, on_step=on_step)
        if len(X_val):
            val = trainer.evaluate(X_val, y_val)
            metrics["val_loss"] = val.mean_loss
            if val.accuracy is not None:
                metrics["val_accuracy"] = val.accuracy
        accuracy = metrics.get("val_accuracy", metrics.get("train_accuracy"))
        if accuracy is not None:
            metrics["error_rate"] = 1.0 - accuracy
        history.append(metrics)
        if on_epoch is not None:
            on_epoch(trainer.epoch, metrics)
        if on_checkpoint is not None and (
            trainer.epoch % spec.checkpoint_every_epochs == 0 or trainer.epoch == last_epoch
        ):
            on_checkpoint(trainer.epoch, trainer.save())
    test: Metrics = {}
    if trainer.epoch == spec.epochs and dataset.X_test is not None and dataset.y_test is not None:
        result = trainer.evaluate(dataset.X_test, dataset.y_test)
        test["test_loss"] = result.mean_loss
        if result.accuracy is not None:
            test["test_accuracy"] = result.accuracy
    return FitResult(trainer=trainer, history=history, test=test)
