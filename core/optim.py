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
    def __init__(self, spec: Any, parameters: Iterable[Triple]) -> None:
        self.spec = spec
        self.params = list(parameters)
        self.lr = float(spec.lr)
        self.steps = 0
        self.state: dict[str, dict[str, Any]] = {name: {} for name, _, _ in self.params}

    def step(self) -> None:
        self.steps += 1
        for name, param, grad in self.params:
            self._update(self.state[name], param, grad)

    def _update(self, state: dict[str, Any], param: Any, grad: Any) -> None:
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


class SGD(Optimizer):
    """g += wd * p;  buf = mu * buf + (1 - dampening) * g  (buf = g at first);
    g = g + mu * buf (nesterov) or buf;  p -= lr * g.

    Each product is rounded before the sum it feeds, as in the expressions above;
    the arithmetic runs in place, through one work array per shape.
    """

    spec: SgdSpec

    def _update(self, state: dict[str, Any], param: Any, grad: Any) -> None:
        spec = self.spec
        xp = array_module(param)
        tmp = _work_array(self, param)
        g = grad
        if spec.weight_decay:
            decayed = _work_array(self, param, "decayed")
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
        xp.multiply(g, self.lr, out=tmp)
        param -= tmp


class Adam(Optimizer):
    """m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;
    p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps).

    Adam adds ``weight_decay * p`` to the gradient (L2); AdamW decays the weights
    directly, ``p *= 1 - lr * wd``, before the step.
    """

    spec: AdamSpec | AdamWSpec
    decoupled = False

    def _update(self, state: dict[str, Any], param: Any, grad: Any) -> None:
        spec = self.spec
        beta1, beta2 = spec.betas
        xp = array_module(param)
        tmp = _work_array(self, param)
        if spec.weight_decay:
            if self.decoupled:
                param *= 1.0 - self.lr * spec.weight_decay
            else:
                decayed = _work_array(self, param, "decayed")
                xp.multiply(param, spec.weight_decay, out=decayed)
                decayed += grad
                grad = decayed
        if "exp_avg" not in state:
            state["exp_avg"] = xp.zeros_like(param)
            state["exp_avg_sq"] = xp.zeros_like(param)
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
        param -= update


class AdamW(Adam):
    decoupled = True


def _work_array(optimizer: Optimizer, param: Any, name: str = "tmp") -> Any:
    """A scratch array shaped like ``param`` (not optimizer state: never saved)."""
    work = optimizer.__dict__.setdefault("_work", {})
    key = (name, param.shape, param.dtype.str)
    array = work.get(key)
    if array is None:
        array = work[key] = array_module(param).empty_like(param)
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
