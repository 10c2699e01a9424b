"""Optimizers, learning-rate schedules and gradient clipping.

An optimizer updates parameters in place from ``(name, param, grad)`` triples
and keeps its state in arrays that :meth:`Optimizer.state_dict` hands out for
checkpoints. Numerics follow PyTorch (``torch.optim.SGD``, ``Adam``, ``AdamW``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np

from core.backend import array_module, to_numpy
from core.spec import AdamSpec, AdamWSpec, ScheduleSpec, SgdSpec, parse_optimizer_spec

Triple = tuple[str, Any, Any]


class Optimizer:
    #: The arrays of state a parameter may have (each shaped like the parameter).
    state_keys: tuple[str, ...] = ()

    def __init__(self, spec: Any, parameters: Iterable[Triple]) -> None:
        self.spec = spec
        self.params = list(parameters)
        self.lr = float(spec.lr)
        self.steps = 0
        self.state: dict[str, dict[str, Any]] = {name: {} for name, _, _ in self.params}

    def bind(self, *, params: list[Any] | None = None, grads: list[Any] | None = None) -> None:
        """Update ``params`` and read ``grads`` (one per parameter, in order) from now on."""
        old = self.params
        new = [
            (name, p if params is None else params[i], g if grads is None else grads[i])
            for i, (name, p, g) in enumerate(old)
        ]
        if all(a[1] is b[1] and a[2] is b[2] for a, b in zip(old, new, strict=True)):
            return
        self.params = new
        # The small-parameter group gathers its state again from the (kept) slots.
        self.__dict__.pop("_group", None)

    def step(self) -> None:
        self.steps += 1
        group = self._small_group()
        for name, param, grad in self.params:
            if name not in group.names:
                self._update(self.state[name], param, grad)
        if group.names:
            self._step_group(group)

    # Small parameters (biases, small layers) are updated together, as one flat array:
    # the update is a dozen array operations whatever the size, and on arrays of a few
    # hundred numbers their overhead is the whole cost. The arithmetic is elementwise,
    # so every number is computed exactly as it would be alone. The state of a grouped
    # parameter is a view of the group's flat state (what ``state_dict`` hands out).

    def _small_group(self) -> _Group:
        group = self.__dict__.get("_group")
        if group is None:
            members = [
                (name, param, grad)
                for name, param, grad in self.params
                if param.size <= _GROUP_MAX_SIZE
                and param.flags.c_contiguous
                and grad.flags.c_contiguous
                and param.dtype == self.params[0][1].dtype
                and array_module(param) is array_module(self.params[0][1])
            ]
            group = self.__dict__["_group"] = _Group(members if len(members) > 1 else [])
        return group

    def _step_group(self, group: _Group) -> None:
        slots = [self.state[name] for name in group.names]
        if not group.in_sync(slots):
            group.shared = []
            keys = {key for s in slots for key in s}
            if any(set(s) != keys for s in slots):  # some parameters have state, some not
                group.state.clear()
                for name, param, grad in zip(group.names, group.params, group.grads, strict=True):
                    self._update(self.state[name], param, grad)
                return
            # state loaded or set from outside: gather it
            xp = array_module(group.grad_values)
            group.state = {key: xp.empty_like(group.grad_values) for key in keys}
            for key, flat in group.state.items():
                for s, part in zip(slots, group.parts, strict=True):
                    flat[part] = s[key].reshape(-1)
        for view, grad in zip(group.views(group.grad_values), group.grads, strict=True):
            view[...] = grad
        values = None
        if self._reads_values():
            values = group.values
            for view, param in zip(group.views(values), group.params, strict=True):
                view[...] = param
        for param in group.params:
            self._decay(param)
        update = self._direction(group.state, values, group.grad_values)
        for param, view in zip(group.params, group.views(update), strict=True):
            param -= view
        if not group.shared:
            group.share(slots)

    def _update(self, state: dict[str, Any], param: Any, grad: Any) -> None:
        if (
            _CHUNK
            and state
            and param.size > _CHUNK
            and param.flags.c_contiguous
            and grad.flags.c_contiguous
            and all(v.flags.c_contiguous for v in state.values())
        ):
            # A large parameter a piece at a time: the dozen elementwise passes of an
            # update then run in cache instead of streaming every array from memory
            # each time. Elementwise arithmetic: the same numbers as in one piece.
            flat_param, flat_grad = param.reshape(-1), grad.reshape(-1)
            flat_state = {k: v.reshape(-1) for k, v in state.items()}
            for start in range(0, param.size, _CHUNK):
                part = slice(start, start + _CHUNK)
                piece = {k: v[part] for k, v in flat_state.items()}
                self._decay(flat_param[part])
                flat_param[part] -= self._direction(piece, flat_param[part], flat_grad[part])
            return
        self._decay(param)
        param -= self._direction(state, param, grad)

    def _decay(self, param: Any) -> None:
        """Weight decay applied to the parameter itself, before the step (AdamW)."""

    def _reads_values(self) -> bool:
        """Whether ``_direction`` reads the parameter's values (L2 weight decay)."""
        return bool(self.spec.weight_decay)

    def _direction(self, state: dict[str, Any], param: Any, grad: Any) -> Any:
        """What to subtract from the parameter (a work array), updating ``state``."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, np.ndarray]:
        out = {"steps": np.asarray(self.steps, dtype=np.int64), "lr": np.asarray(self.lr)}
        for name, slots in self.state.items():
            for slot, value in slots.items():
                out[f"{name}.{slot}"] = to_numpy(value).copy()
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        self.lr = float(state["lr"])
        for name, param, _ in self.params:
            slots = self.state[name]
            slots.clear()
            prefix = f"{name}."
            for key, value in state.items():
                if key.startswith(prefix):
                    slot = key[len(prefix) :]
                    slots[slot] = array_module(param).asarray(value, dtype=param.dtype).copy()


_GROUP_MAX_SIZE = 1 << 16
#: Elements of a large parameter updated at a time (0: all at once): half a MiB of float32
#: per array, so a piece's arrays stay in the L2 or L3 cache through the update's passes.
#: (Pieces of 32k numbers, within a 1 MiB L2 cache, made the MLP of bench/engine.py 3-8%
#: slower a step than these on a 2-core Zen 3 EPYC: a call per pass per piece.)
_CHUNK = 1 << 17


class _Group:
    """Small parameters updated as one flat array: their gradients (and, where the
    update reads them, values) are gathered into ``grad_values`` (``values``), and
    their state lives in ``state``, of which each parameter's slots are views."""

    def __init__(self, members: list[Triple]) -> None:
        self.names = [name for name, _, _ in members]
        self.params = [param for _, param, _ in members]
        self.grads = [grad for _, _, grad in members]
        self.parts: list[slice] = []
        start = 0
        for param in self.params:
            self.parts.append(slice(start, start + param.size))
            start += param.size
        self.state: dict[str, Any] = {}
        self.shared: list[tuple[dict[str, Any], str, Any]] = []
        self._views: dict[int, tuple[Any, list[Any]]] = {}
        if self.params:
            xp = array_module(self.params[0])
            self.values = xp.empty(start, dtype=self.params[0].dtype)
            self.grad_values = xp.empty_like(self.values)

    def views(self, flat: Any) -> list[Any]:
        """Each parameter's part of a flat array, shaped like the parameter (kept)."""
        held = self._views.get(id(flat))
        if held is None or held[0] is not flat:
            pairs = zip(self.params, self.parts, strict=True)
            parts = [flat[part].reshape(param.shape) for param, part in pairs]
            held = self._views[id(flat)] = (flat, parts)
        return held[1]

    def share(self, slots: list[dict[str, Any]]) -> None:
        """Make every parameter's state slots views of the flat state."""
        self.shared = []
        for key, flat in self.state.items():
            for s, view in zip(slots, self.views(flat), strict=True):
                s[key] = view
                self.shared.append((s, key, view))

    def in_sync(self, slots: list[dict[str, Any]]) -> bool:
        """Whether the slots are the views made by the last ``share`` (or all empty)."""
        if not self.shared:
            return not self.state and not any(slots)
        if any(len(s) != len(self.state) for s in slots):
            return False
        ids = {id(s) for s in slots}
        return all(id(s) in ids and s.get(key) is view for s, key, view in self.shared)


class SGD(Optimizer):
    """g += wd * p;  buf = mu * buf + (1 - dampening) * g  (buf = g at first);
    g = g + mu * buf (nesterov) or buf;  p -= lr * g.

    Each product is rounded before the sum it feeds, as in the expressions above;
    the arithmetic runs in place, through one work array per shape.
    """

    spec: SgdSpec
    state_keys = ("momentum",)

    def _direction(self, state: dict[str, Any], param: Any, grad: Any) -> Any:
        spec = self.spec
        xp = array_module(grad)
        tmp = _work_array(self, grad)
        g = grad
        if spec.weight_decay:
            decayed = _work_array(self, grad, "decayed")
            xp.multiply(param, spec.weight_decay, out=decayed)
            decayed += grad
            g = decayed
        if spec.momentum:
            buf = state.get("momentum")
            if buf is None:
                buf = state["momentum"] = g.copy()
            else:
                buf *= spec.momentum
                if spec.dampening:
                    xp.multiply(g, 1.0 - spec.dampening, out=tmp)
                    buf += tmp
                else:  # 1.0 * g is g
                    buf += g
            if spec.nesterov:
                xp.multiply(buf, spec.momentum, out=tmp)
                tmp += g
                g = tmp
            else:
                g = buf
        return xp.multiply(g, self.lr, out=tmp)


class Adam(Optimizer):
    """m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;
    p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps).

    Adam adds ``weight_decay * p`` to the gradient (L2); AdamW decays the weights
    directly, ``p *= 1 - lr * wd``, before the step.
    """

    spec: AdamSpec | AdamWSpec
    state_keys = ("exp_avg", "exp_avg_sq")
    decoupled = False

    def _decay(self, param: Any) -> None:
        if self.decoupled and self.spec.weight_decay:
            param *= 1.0 - self.lr * self.spec.weight_decay

    def _reads_values(self) -> bool:
        return bool(self.spec.weight_decay) and not self.decoupled

    def _direction(self, state: dict[str, Any], param: Any, grad: Any) -> Any:
        spec = self.spec
        beta1, beta2 = spec.betas
        xp = array_module(grad)
        tmp = _work_array(self, grad)
        if spec.weight_decay and not self.decoupled:
            decayed = _work_array(self, grad, "decayed")
            xp.multiply(param, spec.weight_decay, out=decayed)
            decayed += grad
            grad = decayed
        if "exp_avg" not in state:
            state["exp_avg"] = xp.zeros_like(grad)
            state["exp_avg_sq"] = xp.zeros_like(grad)
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m *= beta1
        xp.multiply(grad, 1.0 - beta1, out=tmp)
        m += tmp
        v *= beta2
        xp.multiply(grad, grad, out=tmp)
        tmp *= 1.0 - beta2
        v += tmp
        t = self.steps
        step_size = self.lr / (1.0 - beta1**t)
        denom = xp.sqrt(v, out=tmp)
        denom *= 1.0 / math.sqrt(1.0 - beta2**t)
        denom += spec.eps
        update = xp.divide(m, denom, out=tmp)
        update *= step_size
        return update


class AdamW(Adam):
    decoupled = True


def _work_array(optimizer: Optimizer, like: Any, name: str = "tmp") -> Any:
    """A scratch array shaped like ``like`` (not optimizer state: never saved)."""
    work = optimizer.__dict__.setdefault("_work", {})
    key = (name, like.shape, like.dtype.str)
    array = work.get(key)
    if array is None:
        array = work[key] = array_module(like).empty_like(like)
    return array


OPTIMIZERS: dict[str, type[Optimizer]] = {"sgd": SGD, "adam": Adam, "adamw": AdamW}


def build_optimizer(spec: Any, model_or_params: Any) -> Optimizer:
    """An optimizer from its spec over a model's parameters (or ``(name, p, g)`` triples)."""
    opt_spec = parse_optimizer_spec(spec)
    params = (
        model_or_params.parameters() if hasattr(model_or_params, "parameters") else model_or_params
    )
    return OPTIMIZERS[opt_spec.type](opt_spec, params)


def scheduled_lr(
    base_lr: float, schedule: ScheduleSpec, *, step: int, steps_per_epoch: int, total_steps: int
) -> float:
    """The learning rate for optimizer step ``step`` (0-based)."""
    if schedule.warmup_steps and step < schedule.warmup_steps:
        return base_lr * (step + 1) / schedule.warmup_steps
    if schedule.type == "step":
        epoch = step // max(steps_per_epoch, 1)
        return base_lr * schedule.gamma ** (epoch // schedule.step_epochs)
    if schedule.type == "cosine":
        span = max(total_steps - schedule.warmup_steps, 1)
        progress = min((step - schedule.warmup_steps) / span, 1.0)
        return schedule.min_lr + (base_lr - schedule.min_lr) * 0.5 * (
            1 + math.cos(math.pi * progress)
        )
    return base_lr


def clip_grad_norm(grads: Iterable[Any], max_norm: float) -> float:
    """Scale gradients in place so their global L2 norm is at most ``max_norm``.

    Returns the norm before clipping (as ``torch.nn.utils.clip_grad_norm_``).
    """
    grads = list(grads)
    total = math.sqrt(sum(float((g * g).sum()) for g in grads))
    scale = max_norm / (total + 1e-6)
    if scale < 1.0:
        for g in grads:
            g *= scale
    return total
