"""The training worker: a plain class, made a Ray actor where the group is created.

Each worker holds a full replica of the model. Per step it computes the
gradients of its slots of the global batch, writes each slot's flattened
gradient (and loss) into one row of a flat buffer, all-reduces the rows along
the fixed tree of :mod:`workers.allreduce` and, when the sum is finite, takes
the optimizer step on it. Every replica takes the same step on the same sum, so
replicas stay identical.

The model's gradients are views of those rows: a slot's backward writes its
gradient where the all-reduce reads it, and the optimizer steps from the sum
where the all-reduce wrote it. On one node's shared memory the rows and the sum
live in the shared segment itself (resident rows), so a step copies nothing.
There the node's workers also share one copy of the parameters and take the
optimizer step together, each on its part (:mod:`workers.sharded`).

Deterministic mode: slots are ``MICRO_SHARDS`` fixed pieces of the global
batch, so the sum is the same whatever the number of workers. A worker runs its
slots through a groupable model (:attr:`core.model.Model.groupable`) as one
batch, each slot's gradient taken apart with the numbers it gets alone; other
models go slot by slot. Where the rows are resident, that backward also adds up
the worker's slots along the summation tree (the product of each slot, then
the pairs, in the all-reduce's order: the same bits), so each worker writes one
row per subtree it holds, not one per slot, and the sum reads only those.
Fast mode: one slot per worker (its contiguous part of the batch), one forward
and backward per step; the bits then depend on the number of workers.

Models with running statistics (batchnorm) reduce them too: each slot's
forward starts from the same statistics, and the replicas keep the mean over
the non-empty slots of the statistics each slot produced.
"""

from __future__ import annotations

import math
import os
import socket
import time
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import ray
from threadpoolctl import threadpool_info, threadpool_limits

from core.backend import to_numpy
from core.data import epoch_order
from core.layers.base import add_along
from core.spec import JobSpec, parse_job_spec
from core.train import BatchStats, Trainer
from workers.allreduce import (
    AllReduce,
    AllReduceSetup,
    chunk_bounds,
    make_allreduce,
    owned_slots,
    span_tree,
)
from workers.sharded import NodeOptimizer, shared_rows_needed


@dataclass(frozen=True)
class WorkerInfo:
    rank: int
    pid: int
    node_id: str
    hostname: str
    #: Free space in the node's ``/dev/shm`` when the worker started (None: no such
    #: file system here).
    shm_free_bytes: int | None = None
    #: Threads of each BLAS loaded in the worker (see :data:`BLAS_THREADS`).
    blas_threads: tuple[int, ...] = ()


#: BLAS threads of every worker. A product's bits depend on how many threads compute it
#: (OpenBLAS splits the rows among them, and its kernels for the last rows add in
#: another order), so workers must all use the same number, whatever the environment
#: of their node says (``OMP_NUM_THREADS``, ``OPENBLAS_NUM_THREADS``); a worker has one CPU.
BLAS_THREADS = 1


def blas_threads() -> tuple[int, ...]:
    """The threads of each BLAS loaded in this process."""
    return tuple(info["num_threads"] for info in threadpool_info() if info["user_api"] == "blas")


def shm_free_bytes(path: str = "/dev/shm") -> int | None:
    """Bytes free in the shared-memory file system at ``path`` (None where there is none)."""
    try:
        stats = os.statvfs(path)
    except OSError:
        return None
    return stats.f_bavail * stats.f_frsize


@dataclass(frozen=True)
class SlotStats:
    """Sums over the samples of one slot of one step."""

    slot: int
    loss_sum: float
    samples: int
    correct: int
    predicted: int


@dataclass(frozen=True)
class StepResult:
    """What one worker reports after one step."""

    slots: tuple[SlotStats, ...]
    #: Whether the all-reduced loss and gradients were finite (and so applied).
    finite: bool
    #: Optimizer steps taken so far (unchanged when the step was not applied).
    step: int
    allreduce_time_s: float
    #: How long the whole step took on this worker.
    seconds: float = 0.0


@dataclass(frozen=True)
class EpochReport:
    """Rank 0's end-of-epoch numbers."""

    lr: float
    diagnostics: dict[str, float]
    val: tuple[float, int, int, int] | None
    allreduce_time_s: float
    #: False when a finite gradient still pushed a weight to NaN or infinity.
    weights_finite: bool = True


def slot_bounds(batch_size: int, num_slots: int) -> list[int]:
    """Where each slot of a batch of ``batch_size`` starts and ends."""
    return chunk_bounds(batch_size, num_slots)


class TrainWorker:
    """One rank of a data-parallel group (see the module docstring)."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank = rank
        self.world_size = world_size
        threadpool_limits(limits=BLAS_THREADS, user_api="blas")  # for the process's life
        self.trainer: Trainer | None = None
        self.allreduce: AllReduce | None = None
        self._epoch_in_progress: int | None = None
        self._allreduce_time_s = 0.0
        self._order_cache: tuple[int, np.ndarray] | None = None
        self._node_optimizer: NodeOptimizer | None = None
        self._resident = False

    # --- identity -------------------------------------------------------------------------

    def info(self) -> WorkerInfo:
        node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
        return WorkerInfo(
            rank=self.rank,
            pid=os.getpid(),
            node_id=node_id,
            hostname=socket.gethostname(),
            shm_free_bytes=shm_free_bytes(),
            blas_threads=blas_threads(),
        )

    def ping(self) -> int:
        return os.getpid()

    # --- the job ---------------------------------------------------------------------------

    def setup_job(
        self,
        job: dict[str, Any],
        data: dict[str, Any],
        *,
        input_shape: tuple[int, ...],
        num_classes: int | None,
        deterministic: bool,
        micro_shards: int,
        checkpoint: bytes | None = None,
        dataset_meta: dict[str, Any] | None = None,
    ) -> tuple[int, int, int]:
        """Build the replica (seeded, so identical on every rank) and load ``checkpoint``.

        ``data`` maps ``X_train, y_train, X_val, y_val`` (and optionally ``X_test,
        y_test``) to arrays or to Ray object references of arrays, read in place.
        ``dataset_meta`` (a text model's vocabulary) is saved with every checkpoint.
        Returns ``(epoch, step, flat length)``.
        """
        spec: JobSpec = parse_job_spec(job)
        self.job = spec
        self.data = _resolve(data)
        self.trainer = Trainer(
            model_spec=spec.model,
            optimizer_spec=spec.optimizer,
            training=spec.training,
            input_shape=tuple(input_shape),
            num_classes=num_classes,
            device=spec.resources.device,
            dataset_meta=dataset_meta,
        )
        if checkpoint is not None:
            self.trainer.load(checkpoint)
        model = self.trainer.model
        self.deterministic = deterministic
        self.num_slots = micro_shards if deterministic else self.world_size
        self._grads = [g for _, _, g in model.parameters()]
        self._buffers = [buffer for layer in model.layers for buffer in layer.buffers.values()]
        self._grad_size = sum(int(g.size) for g in self._grads)
        self._buffer_size = sum(int(b.size) for b in self._buffers)
        # One row per slot: [gradient | running statistics | loss sum].
        self.vector_size = self._grad_size + self._buffer_size + 1
        self._slots = owned_slots(self.rank, self.world_size, self.num_slots)
        self._rows: Any = None
        self._row_list: list[Any] = []
        self._sum: Any = None
        n_train = len(self.data["X_train"])
        self.steps_per_epoch = math.ceil(n_train / spec.training.batch_size)
        self.total_steps = self.steps_per_epoch * spec.training.epochs
        return self.trainer.epoch, self.trainer.step, self.vector_size

    def setup_allreduce(self, setup: AllReduceSetup, phase: str, exchange: Any = None) -> None:
        """Join the group's all-reduce; ``phase`` is ``create``, ``attach`` or ``seal``,
        each run on every rank before the next."""
        assert self.trainer is not None, "setup_job first"
        if phase == "create":
            dtype = self.trainer.model.dtype
            host_model = self.trainer.model.xp is np
            self.allreduce = make_allreduce(
                setup,
                rank=self.rank,
                vector_size=self.vector_size,
                dtype=dtype,
                exchange=exchange,
                shared_rows=shared_rows_needed(self.trainer) if host_model else 0,
            )
            xp = self.allreduce.xp
            self._rows = xp.zeros((len(self._slots), self.vector_size), dtype)
            self._row_list = list(self._rows)
            self._sum = xp.zeros(self.vector_size, dtype)
            self._private_sum = self._sum
        elif phase == "attach":
            assert self.allreduce is not None
            self.allreduce.attach()
            resident = self.allreduce.resident_views()
            self._resident = resident is not None
            if resident is not None:
                self._rows, self._sum = resident
                self._row_list = list(self._rows)
            shared = self.allreduce.shared_views()
            if shared is not None:
                self._node_optimizer = NodeOptimizer(self.trainer, shared)
        elif phase == "seal":
            assert self.allreduce is not None
            self.allreduce.seal()
        else:
            raise ValueError(f"unknown setup phase {phase!r}")

    # --- a step ------------------------------------------------------------------------------

    def _order(self, epoch: int) -> np.ndarray:
        if self._order_cache is None or self._order_cache[0] != epoch:
            spec = self.job.training
            order = epoch_order(len(self.data["X_train"]), spec.seed, epoch, spec.shuffle)
            self._order_cache = (epoch, order)
        return self._order_cache[1]

    def train_steps(self, epoch: int, batch_indices: list[int]) -> list[StepResult]:
        """:meth:`train_step` on each batch in turn (one call for several steps saves
        round trips); stops after a step whose sum was not finite, as every rank does."""
        results = []
        for batch_index in batch_indices:
            results.append(self.train_step(epoch, batch_index))
            if not results[-1].finite:
                break
        return results

    def train_step(self, epoch: int, batch_index: int) -> StepResult:
        """Batch ``batch_index`` of epoch ``epoch`` (in that epoch's seeded order)."""
        trainer = self.trainer
        assert trainer is not None and self.allreduce is not None, "set up first"
        step_started = time.perf_counter()
        if self._epoch_in_progress != epoch:
            self._begin_epoch(epoch)
        batch_size = self.job.training.batch_size
        index = self._order(epoch)[batch_index * batch_size : (batch_index + 1) * batch_size]
        bounds = slot_bounds(len(index), self.num_slots)
        X, y = self.data["X_train"], self.data["y_train"]
        saved_buffers = [b.copy() for b in self._buffers]
        bind = self._binds_grads()
        batches: dict[int, BatchStats] = {}
        filled = []
        # The same row objects every step: the model keeps its views of each row.
        for row, slot in zip(self._row_list, self._slots, strict=True):
            if bounds[slot + 1] > bounds[slot]:
                filled.append((row, slot))
            else:
                row[...] = 0
        presum = None
        first = self._slots.start
        if bind and len(filled) > 1 and trainer.model.groupable:
            # The slots in one forward and backward, each slot's numbers its own. Where
            # the all-reduce takes subtree sums and every slot of the batch has samples
            # (every rank decides alike), the backward adds up this rank's slots along
            # the tree itself, into the row of each subtree's first slot.
            if len(index) >= self.num_slots:
                presum = self.allreduce.presum_spans(self.num_slots)
            parts = [index[bounds[slot] : bounds[slot + 1]] for _, slot in filled]
            rows = np.concatenate(parts)
            groups = trainer.compute_group_gradients(
                X[rows],
                y[rows],
                np.cumsum([0, *map(len, parts)]).tolist(),
                [row for row, _ in filled]
                if presum is None
                else [self._row_list[a - first] for a, _ in presum],
                total=len(index),
                trees=None if presum is None else [span_tree(span, first) for span in presum],
            )
            batches = {slot: batch for (_, slot), batch in zip(filled, groups, strict=True)}
        for row, slot in filled:
            batch = batches.get(slot)
            if batch is None:
                for buffer, saved in zip(self._buffers, saved_buffers, strict=True):
                    buffer[...] = saved
                if bind:
                    trainer.model.bind_grads(row)
                trainer.model.zero_grad()
                part = index[bounds[slot] : bounds[slot + 1]]
                batch = batches[slot] = trainer.compute_gradients(
                    X[part], y[part], scale=len(part) / len(index), rng_key=(slot,)
                )
            if presum is None:
                self._flatten_into(row, batch, grads=not bind)
        if presum is not None:  # a groupable model has no running statistics: the loss
            for span in presum:
                row = self._row_list[span[0] - first]
                losses = [row.dtype.type(batches[slot].loss_sum) for slot in range(*span)]
                row[-1] = add_along(span_tree(span, span[0]), losses)
        for buffer, saved in zip(self._buffers, saved_buffers, strict=True):
            buffer[...] = saved
        empty = BatchStats()
        stats = [
            SlotStats(slot, b.loss_sum, b.samples, b.correct, b.predicted)
            for slot, b in ((slot, batches.get(slot, empty)) for slot in self._slots)
        ]
        started = time.perf_counter()
        total = self._sum
        if self._resident:
            finite = self.allreduce.reduce_resident(
                self.num_slots, ordered=self.deterministic, presummed=presum is not None
            )
            if finite and self.job.training.grad_clip_norm is not None:
                # Clipping scales the gradient in place: not the sum every rank reads.
                self._private_sum[...] = total
                total = self._private_sum
        else:
            self.allreduce.reduce(self._rows, self.num_slots, total, ordered=self.deterministic)
            finite = bool(self.allreduce.xp.isfinite(total).all())
        elapsed = time.perf_counter() - started
        self._allreduce_time_s += elapsed
        if finite:
            nonempty = sum(1 for s in range(self.num_slots) if bounds[s + 1] > bounds[s])
            if bind:
                trainer.bind_grads(total)
            self._unflatten_sum(total, nonempty, grads=not bind)
            diagnose = batch_index == self.steps_per_epoch - 1
            node_optimizer = self._node_optimizer
            if node_optimizer is not None:
                node_optimizer.take_norms(total)
            trainer.apply_gradients(
                steps_per_epoch=self.steps_per_epoch,
                total_steps=self.total_steps,
                diagnose=diagnose and self.rank == 0,
                update=(
                    None
                    if node_optimizer is None
                    else partial(
                        node_optimizer.update, total, diagnose=diagnose, report=self.rank == 0
                    )
                ),
                # Only rank 0 reports the per-layer diagnostics (with a node optimizer,
                # the node's workers take the gradient norms together).
                record=self.rank == 0 and node_optimizer is None,
            )
        return StepResult(
            slots=tuple(stats),
            finite=finite,
            step=trainer.step,
            allreduce_time_s=elapsed,
            seconds=time.perf_counter() - step_started,
        )

    def _binds_grads(self) -> bool:
        """Whether the model's gradients can be views of the all-reduce rows (same device)."""
        assert self.trainer is not None and self.allreduce is not None
        return self.trainer.model.xp is self.allreduce.xp

    def _flatten_into(self, row: Any, batch: BatchStats, *, grads: bool) -> None:
        """Write a slot's row: its gradients (unless the backward wrote them there),
        its running statistics and its loss sum."""
        assert self.trainer is not None
        to_row = self.allreduce.xp.asarray  # type: ignore[union-attr]
        arrays = (*self._grads, *self._buffers) if grads else self._buffers
        offset = 0 if grads else self._grad_size
        for array in arrays:
            size = int(array.size)
            row[offset : offset + size] = to_row(_same_device(array, row).reshape(-1))
            offset += size
        row[offset] = batch.loss_sum

    def _unflatten_sum(self, total: Any, nonempty_slots: int, *, grads: bool) -> None:
        """Take the summed running statistics (and gradients, unless bound to the sum)."""
        assert self.trainer is not None
        to_model = self.trainer.model.xp.asarray
        offset = 0
        for grad in self._grads if grads else ():
            size = int(grad.size)
            grad[...] = to_model(_same_device(total[offset : offset + size], grad)).reshape(
                grad.shape
            )
            offset += size
        offset = self._grad_size
        for buffer in self._buffers:
            size = int(buffer.size)
            part = to_model(_same_device(total[offset : offset + size], buffer))
            buffer[...] = part.reshape(buffer.shape) / nonempty_slots
            offset += size

    def _begin_epoch(self, epoch: int) -> None:
        assert self.trainer is not None
        self.trainer.begin_epoch()
        self._epoch_in_progress = epoch
        self._allreduce_time_s = 0.0

    def finish_epoch(self, epoch: int, *, evaluate: bool) -> EpochReport | None:
        """Mark epoch ``epoch`` (0-based) done; rank 0 also validates and reports."""
        trainer = self.trainer
        assert trainer is not None
        if self._epoch_in_progress != epoch:  # every step of the epoch was skipped
            self._begin_epoch(epoch)
        trainer.epoch = epoch + 1
        self._epoch_in_progress = None
        if self.rank != 0:
            return None
        report = trainer.epoch_diagnostics()
        xp = trainer.model.xp
        if not all(bool(xp.isfinite(v).all()) for v in trainer.model.state_dict().values()):
            return EpochReport(
                lr=float(trainer.optimizer.lr),
                diagnostics=report,
                val=None,
                allreduce_time_s=self._allreduce_time_s,
                weights_finite=False,
            )
        val = None
        if evaluate and len(self.data["X_val"]):
            stats = trainer.evaluate(self.data["X_val"], self.data["y_val"])
            val = (stats.loss_sum, stats.samples, stats.correct, stats.predicted)
        return EpochReport(
            lr=float(trainer.optimizer.lr),
            diagnostics=report,
            val=val,
            allreduce_time_s=self._allreduce_time_s,
        )

    def evaluate_test(self) -> tuple[float, int, int, int] | None:
        assert self.trainer is not None
        X, y = self.data.get("X_test"), self.data.get("y_test")
        if X is None or y is None or not len(X):
            return None
        stats = self.trainer.evaluate(X, y)
        return (stats.loss_sum, stats.samples, stats.correct, stats.predicted)

    # --- state ---------------------------------------------------------------------------------

    def save(self) -> bytes:
        assert self.trainer is not None
        if self._node_optimizer is not None:
            self._node_optimizer.export_state()
        return self.trainer.save()

    def load(self, checkpoint: bytes) -> tuple[int, int]:
        assert self.trainer is not None
        self.trainer.load(checkpoint)  # the parameters are copied into the shared ones
        if self._node_optimizer is not None:
            self._node_optimizer.adopt_state()
        self._epoch_in_progress = None
        return self.trainer.epoch, self.trainer.step

    def weights(self) -> dict[str, np.ndarray]:
        """Parameters and buffers by name (NumPy copies)."""
        assert self.trainer is not None
        return {k: to_numpy(v) for k, v in self.trainer.model.state_dict().items()}

    def close(self) -> None:
        self._node_optimizer = None
        if self.allreduce is not None:
            self.allreduce.close()
            self.allreduce = None


def _same_device(array: Any, like: Any) -> Any:
    """``array`` moved to host memory when ``like`` lives there (GPU model, host all-reduce)."""
    if isinstance(like, np.ndarray) and not isinstance(array, np.ndarray):
        return to_numpy(array)
    return array


def _resolve(data: dict[str, Any]) -> dict[str, Any]:
    """Arrays as given, or fetched from Ray's object store (mapped, not copied, on this node)."""
    refs = {k: v for k, v in data.items() if isinstance(v, ray.ObjectRef)}
    if not refs:
        return dict(data)
    values = ray.get(list(refs.values()))
    return {**data, **dict(zip(refs, values, strict=True))}
