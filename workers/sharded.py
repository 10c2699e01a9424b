"""One copy of the parameters per node, stepped by all of the node's workers.

Data-parallel replicas on one node would otherwise each hold the same weights
and optimizer state and each take the same optimizer step on them, so that
step (a dozen passes over every parameter with Adam) would cost as much with
two workers as with one. Here the node's workers share one copy, in the
all-reduce's shared memory: each updates its own part of the flat parameters,
with the optimizer state of that part, then they wait for each other. The
arithmetic of an optimizer step is elementwise, so the weights are the same
bits as when every replica updates everything.

The per-layer gradient norms of the diagnostics are shared out the same way:
each worker takes the dot products of some fixed blocks of the gradient
(:data:`core.train.NORM_BLOCK`), and the reporting worker adds them up in the
order :func:`core.train.squared_norm` does.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from core.optim import OPTIMIZERS, Optimizer
from core.train import NORM_BLOCK, Trainer
from workers.allreduce import SharedRows


def shared_rows_needed(trainer: Trainer) -> int:
    """Shared rows for a trainer's parameters, optimizer state and gradient norms."""
    return 2 + len(trainer.optimizer.state_keys)


class NodeOptimizer:
    """This worker's part of its node's optimizer step (see the module docstring).

    ``shared.rows`` holds the flat parameters, then one row per optimizer state
    array (``state_keys`` order), each at least as long as the parameters, then
    the squared norms of the gradient's blocks.
    """

    def __init__(self, trainer: Trainer, shared: SharedRows) -> None:
        self.trainer = trainer
        self.shared = shared
        self._sizes = [
            (name, param.size, param.shape) for name, param, _ in trainer.optimizer.params
        ]
        self.size = sum(size for _, size, _ in self._sizes)
        self.part = shared.part(self.size)
        params, *state_rows, norms = shared.rows
        self.params = params[: self.size]
        self._block_norms = norms
        model = trainer.model
        # The diagnostics' layer of each parameter, in flat order.
        self._layer_of = [
            name
            for name, layer in zip(model.layer_names(), model.layers, strict=True)
            for _ in layer.params
        ]
        # The parameter of each block, and where in the flat gradient the block lies.
        self._blocks: list[tuple[int, int, int]] = []
        offset = 0
        for index, (_, size, _) in enumerate(self._sizes):
            for start in range(0, size, NORM_BLOCK):
                self._blocks.append((index, offset + start, min(NORM_BLOCK, size - start)))
            offset += size
        self._my_blocks = [
            (j, start, length)
            for j, (_, start, length) in enumerate(self._blocks)
            if self.part.start <= start < self.part.stop
        ]
        self.state_rows = {
            key: row[: self.size]
            for key, row in zip(trainer.optimizer.state_keys, state_rows, strict=True)
        }
        # Every worker copies the same values in; from now on the model reads them there.
        trainer.bind_params(self.params)
        optimizer = trainer.optimizer
        spec = optimizer.spec
        self.optimizer: Optimizer = OPTIMIZERS[spec.type](
            spec, [("flat", self.params[self.part], np.empty(0, self.params.dtype))]
        )
        self._grad_parts: dict[int, tuple[Any, Any]] = {}
        self.adopt_state()

    def adopt_state(self) -> None:
        """Take the trainer's optimizer state (after a checkpoint was loaded into it)."""
        trainer_optimizer = self.trainer.optimizer
        present = [k for k in trainer_optimizer.state_keys if self._has_state(k)]
        for key in present:
            row, offset = self.state_rows[key], 0
            for name, size, _ in self._sizes:
                row[offset : offset + size] = trainer_optimizer.state[name][key].reshape(-1)
                offset += size
        self.optimizer.state["flat"] = {key: self.state_rows[key][self.part] for key in present}
        self.optimizer.steps = trainer_optimizer.steps
        self.optimizer.lr = trainer_optimizer.lr

    def _has_state(self, key: str) -> bool:
        slots = [self.trainer.optimizer.state[name] for name, _, _ in self._sizes]
        have = [key in slot for slot in slots]
        if any(have) and not all(have):
            raise ValueError(f"optimizer state {key!r} is missing for some parameters")
        return bool(have) and all(have)

    def export_state(self) -> None:
        """Give the trainer's optimizer views of the shared state (before it is saved)."""
        trainer_optimizer = self.trainer.optimizer
        for key in self.optimizer.state["flat"]:
            row, offset = self.state_rows[key], 0
            for name, size, shape in self._sizes:
                trainer_optimizer.state[name][key] = row[offset : offset + size].reshape(shape)
                offset += size
        trainer_optimizer.steps = self.optimizer.steps

    def take_norms(self, grads: Any) -> None:
        """This worker's blocks of the squared norm of the flat gradient ``grads`` (before
        clipping): :meth:`update` with ``report`` adds up every worker's."""
        norms = self._block_norms
        for j, start, length in self._my_blocks:
            block = grads[start : start + length]
            norms[j] = block @ block

    def update(self, grads: Any, *, diagnose: bool, report: bool) -> None:
        """Step this worker's part from the flat gradient ``grads``; return once every
        worker of the node has stepped its part. The reporting worker (``report``) then
        records the per-layer gradient norms of :meth:`take_norms`."""
        held = self._grad_parts.get(id(grads))
        if held is None or held[0] is not grads:
            held = self._grad_parts[id(grads)] = (grads, grads[: self.size][self.part])
        optimizer = self.optimizer
        optimizer.bind(grads=[held[1]])
        optimizer.lr = self.trainer.optimizer.lr
        if diagnose:
            # The reporting worker has copied the weights before the step.
            self.shared.wait()
        optimizer.step()
        state = optimizer.state["flat"]
        for key, value in state.items():
            shared = self.state_rows[key][self.part]
            if value is not shared:  # made by this first step: keep it in shared memory
                shared[...] = value
                state[key] = shared
        self.trainer.optimizer.steps = optimizer.steps
        self.shared.wait()
        if report:
            self.trainer.record_grad_norms(self._layer_squared_norms())

    def _layer_squared_norms(self) -> dict[str, float]:
        """Each layer's squared gradient norm from the blocks, summed as
        :func:`core.train.squared_norm` and :meth:`core.train.Trainer.apply_gradients` do."""
        per_param: dict[int, float] = {}
        for j, (index, _, _) in enumerate(self._blocks):
            per_param[index] = per_param.get(index, 0) + float(self._block_norms[j])
        squared: dict[str, float] = {}
        for index, value in per_param.items():
            layer = self._layer_of[index]
            squared[layer] = squared.get(layer, 0) + value
        return squared
