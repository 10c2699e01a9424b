"""Optimizer steps against their closed forms, learning-rate schedules, gradient clipping."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from core import build_model, build_optimizer, clip_grad_norm, optim, scheduled_lr
from core.spec import ScheduleSpec

STEPS = 3


def _triples(rng: np.random.Generator) -> list[tuple[str, np.ndarray, np.ndarray]]:
    return [
        ("0.W", rng.standard_normal((3, 2)), np.zeros((3, 2))),
        ("0.b", rng.standard_normal(2), np.zeros(2)),
    ]


def _run(
    spec: dict[str, Any], params: list[np.ndarray], grads_per_step: list[list[np.ndarray]]
) -> list[np.ndarray]:
    """Take one optimizer step per entry of ``grads_per_step``; the final parameters."""
    triples = [(f"p{i}", p.copy(), np.zeros_like(p)) for i, p in enumerate(params)]
    opt = build_optimizer(spec, triples)
    for grads in grads_per_step:
        for (_, _, g), value in zip(triples, grads, strict=True):
            g[...] = value
        opt.step()
    return [p for _, p, _ in triples]


def _grads(rng: np.random.Generator, params: list[np.ndarray]) -> list[list[np.ndarray]]:
    return [[rng.standard_normal(p.shape) for p in params] for _ in range(STEPS)]


def _params(rng: np.random.Generator) -> list[np.ndarray]:
    return [rng.standard_normal((3, 2)), rng.standard_normal(4)]


# --- constant gradients: closed forms ------------------------------------------------------


def test_sgd_plain_constant_gradient(rng: np.random.Generator) -> None:
    params = _params(rng)
    g = [rng.standard_normal(p.shape) for p in params]
    out = _run({"type": "sgd", "lr": 0.1}, params, [g] * STEPS)
    for p0, gi, p in zip(params, g, out, strict=True):
        np.testing.assert_allclose(p, p0 - STEPS * 0.1 * gi, rtol=1e-12)


def test_sgd_momentum_constant_gradient(rng: np.random.Generator) -> None:
    # buf_t = g (1 + mu + ... + mu^(t-1)), so p_T = p_0 - lr g sum_t (1 - mu^t) / (1 - mu)
    lr, mu = 0.1, 0.9
    params = _params(rng)
    g = [rng.standard_normal(p.shape) for p in params]
    out = _run({"type": "sgd", "lr": lr, "momentum": mu}, params, [g] * STEPS)
    factor = sum((1 - mu**t) / (1 - mu) for t in range(1, STEPS + 1))
    assert factor == pytest.approx(1 + 1.9 + 2.71)
    for p0, gi, p in zip(params, g, out, strict=True):
        np.testing.assert_allclose(p, p0 - lr * factor * gi, rtol=1e-12)


def test_sgd_nesterov_constant_gradient(rng: np.random.Generator) -> None:
    # step t moves by lr (g + mu buf_t) = lr g (1 + mu (1 - mu^t) / (1 - mu))
    lr, mu = 0.05, 0.8
    params = _params(rng)
    g = [rng.standard_normal(p.shape) for p in params]
    out = _run({"type": "sgd", "lr": lr, "momentum": mu, "nesterov": True}, params, [g] * STEPS)
    factor = sum(1 + mu * (1 - mu**t) / (1 - mu) for t in range(1, STEPS + 1))
    for p0, gi, p in zip(params, g, out, strict=True):
        np.testing.assert_allclose(p, p0 - lr * factor * gi, rtol=1e-12)


def test_sgd_weight_decay_with_zero_gradient_shrinks_geometrically(
    rng: np.random.Generator,
) -> None:
    lr, wd = 0.1, 0.5
    params = _params(rng)
    zeros = [np.zeros_like(p) for p in params]
    out = _run({"type": "sgd", "lr": lr, "weight_decay": wd}, params, [zeros] * STEPS)
    for p0, p in zip(params, out, strict=True):
        np.testing.assert_allclose(p, p0 * (1 - lr * wd) ** STEPS, rtol=1e-12)


def test_adam_constant_gradient_moves_lr_per_step(rng: np.random.Generator) -> None:
    # With a constant g the bias-corrected moments are g and g^2 exactly,
    # so every step is lr * g / (|g| + eps).
    lr, eps = 0.01, 1e-8
    params = _params(rng)
    g = [rng.standard_normal(p.shape) for p in params]
    out = _run({"type": "adam", "lr": lr}, params, [g] * STEPS)
    for p0, gi, p in zip(params, g, out, strict=True):
        np.testing.assert_allclose(p, p0 - STEPS * lr * gi / (np.abs(gi) + eps), rtol=1e-10)


def test_adamw_constant_gradient_decays_then_steps(rng: np.random.Generator) -> None:
    lr, wd, eps = 0.01, 0.1, 1e-8
    params = _params(rng)
    g = [rng.standard_normal(p.shape) for p in params]
    out = _run({"type": "adamw", "lr": lr, "weight_decay": wd}, params, [g] * STEPS)
    for p0, gi, p in zip(params, g, out, strict=True):
        expected = p0.copy()
        for _ in range(STEPS):
            expected = expected * (1 - lr * wd) - lr * gi / (np.abs(gi) + eps)
        np.testing.assert_allclose(p, expected, rtol=1e-10)


# --- varying gradients: the update rules written out ----------------------------------------


def _sgd_reference(
    params: list[np.ndarray],
    grads: list[list[np.ndarray]],
    *,
    lr: float,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
) -> list[np.ndarray]:
    out = []
    for i, p0 in enumerate(params):
        p, buf = p0.copy(), None
        for step in grads:
            g = step[i] + weight_decay * p
            if momentum:
                buf = g.copy() if buf is None else momentum * buf + (1 - dampening) * g
                g = g + momentum * buf if nesterov else buf
            p = p - lr * g
        out.append(p)
    return out


def _adam_reference(
    params: list[np.ndarray],
    grads: list[list[np.ndarray]],
    *,
    lr: float,
    weight_decay: float,
    decoupled: bool,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> list[np.ndarray]:
    b1, b2 = betas
    out = []
    for i, p0 in enumerate(params):
        p, m, v = p0.copy(), np.zeros_like(p0), np.zeros_like(p0)
        for t, step in enumerate(grads, start=1):
            g = step[i]
            if decoupled:
                p = p * (1 - lr * weight_decay)
            else:
                g = g + weight_decay * p
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
            p = p - lr * m_hat / (np.sqrt(v_hat) + eps)
        out.append(p)
    return out


@pytest.mark.parametrize(
    "settings",
    [
        {"lr": 0.1},
        {"lr": 0.1, "momentum": 0.9},
        {"lr": 0.1, "momentum": 0.9, "nesterov": True},
        {"lr": 0.1, "momentum": 0.9, "dampening": 0.3},
        {"lr": 0.1, "weight_decay": 0.01},
        {"lr": 0.05, "momentum": 0.5, "nesterov": True, "weight_decay": 0.1},
    ],
    ids=["plain", "momentum", "nesterov", "dampening", "weight-decay", "nesterov-weight-decay"],
)
def test_sgd_matches_the_update_rule(settings: dict[str, Any], rng: np.random.Generator) -> None:
    params = _params(rng)
    grads = _grads(rng, params)
    out = _run({"type": "sgd", **settings}, params, grads)
    for got, want in zip(out, _sgd_reference(params, grads, **settings), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    ("kind", "weight_decay", "decoupled"),
    [("adam", 0.0, False), ("adam", 0.1, False), ("adamw", 0.01, True), ("adamw", 0.2, True)],
    ids=["adam", "adam-l2", "adamw-default-decay", "adamw"],
)
def test_adam_matches_the_update_rule(
    kind: str, weight_decay: float, decoupled: bool, rng: np.random.Generator
) -> None:
    params = _params(rng)
    grads = _grads(rng, params)
    spec: dict[str, Any] = {"type": kind, "lr": 0.01}
    if weight_decay != 0.01:
        spec["weight_decay"] = weight_decay  # adamw's default is 0.01, as in PyTorch
    out = _run(spec, params, grads)
    reference = _adam_reference(
        params, grads, lr=0.01, weight_decay=weight_decay, decoupled=decoupled
    )
    for got, want in zip(out, reference, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize(
    "spec",
    [
        {"type": "sgd", "lr": 0.1, "momentum": 0.9},
        {"type": "adam", "lr": 0.01},
        {"type": "adamw", "lr": 0.01},
    ],
    ids=["sgd-momentum", "adam", "adamw"],
)
def test_optimizer_state_round_trip_continues_the_same_trajectory(
    spec: dict[str, Any], rng: np.random.Generator
) -> None:
    params = _params(rng)
    grads = _grads(rng, params) * 2
    straight = _run(spec, params, grads)

    triples = [(f"p{i}", p.copy(), np.zeros_like(p)) for i, p in enumerate(params)]
    first = build_optimizer(spec, triples)
    for step in grads[:STEPS]:
        for (_, _, g), value in zip(triples, step, strict=True):
            g[...] = value
        first.step()
    state = first.state_dict()
    assert all(value.dtype != object for value in state.values())
    second = build_optimizer(spec, triples)
    second.load_state_dict(state)
    assert second.steps == STEPS
    for step in grads[STEPS:]:
        for (_, _, g), value in zip(triples, step, strict=True):
            g[...] = value
        second.step()
    for (_, p, _), want in zip(triples, straight, strict=True):
        np.testing.assert_array_equal(p, want)


def test_optimizer_updates_a_model_in_place() -> None:
    model = build_model(
        {"layers": [{"type": "dense", "units": 2}], "loss": "mse"}, (3,), dtype="float64"
    )
    opt = build_optimizer({"type": "sgd", "lr": 0.5}, model)
    before = {name: p.copy() for name, p, _ in model.parameters()}
    for _, _, g in model.parameters():
        g[...] = 1.0
    opt.step()
    for name, p, _ in model.parameters():
        np.testing.assert_allclose(p, before[name] - 0.5)


# --- schedules --------------------------------------------------------------------------


def _lr(schedule: dict[str, Any], step: int, *, steps_per_epoch: int = 10, total: int = 100):
    return scheduled_lr(
        0.1, ScheduleSpec(**schedule), step=step, steps_per_epoch=steps_per_epoch, total_steps=total
    )


@pytest.mark.parametrize("step", [0, 1, 57, 99, 1000])
def test_constant_schedule(step: int) -> None:
    assert _lr({}, step) == 0.1


@pytest.mark.parametrize(
    ("step", "expected"),
    [(0, 0.1), (19, 0.1), (20, 0.05), (39, 0.05), (40, 0.025), (65, 0.0125)],
)
def test_step_schedule_decays_every_step_epochs(step: int, expected: float) -> None:
    # 10 steps per epoch, halved every 2 epochs
    assert _lr({"type": "step", "step_epochs": 2, "gamma": 0.5}, step) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        (0, 0.1),
        (25, 0.01 + 0.09 * 0.5 * (1 + math.cos(math.pi / 4))),
        (50, 0.055),
        (75, 0.01 + 0.09 * 0.5 * (1 + math.cos(3 * math.pi / 4))),
        (100, 0.01),
        (150, 0.01),
    ],
)
def test_cosine_schedule_goes_from_lr_to_min_lr(step: int, expected: float) -> None:
    assert _lr({"type": "cosine", "min_lr": 0.01}, step) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    ("step", "expected"), [(0, 0.01), (4, 0.05), (9, 0.1), (10, 0.1), (500, 0.1)]
)
def test_linear_warmup_then_constant(step: int, expected: float) -> None:
    assert _lr({"warmup_steps": 10}, step) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    ("step", "expected"), [(0, 0.005), (19, 0.1), (20, 0.1), (60, 0.05), (100, 0.0)]
)
def test_warmup_then_cosine_over_the_remaining_steps(step: int, expected: float) -> None:
    value = _lr({"type": "cosine", "warmup_steps": 20}, step)
    assert value == pytest.approx(expected, rel=1e-12, abs=1e-15)


# --- clipping ---------------------------------------------------------------------------


def test_clip_grad_norm_scales_to_max_norm_and_returns_the_norm() -> None:
    grads = [np.array([3.0, 0.0]), np.array([[0.0, 4.0], [0.0, 12.0]])]  # norm 13
    original = [g.copy() for g in grads]
    norm = clip_grad_norm(grads, 1.0)
    assert norm == pytest.approx(13.0, rel=1e-12)
    clipped = math.sqrt(sum(float((g * g).sum()) for g in grads))
    assert clipped == pytest.approx(1.0, rel=1e-6)
    for g, g0 in zip(grads, original, strict=True):
        np.testing.assert_allclose(g, g0 * clipped / 13.0, rtol=1e-12)  # direction kept


def test_clip_grad_norm_leaves_small_gradients_alone(rng: np.random.Generator) -> None:
    grads = [rng.standard_normal(5) * 0.01, rng.standard_normal((2, 2)) * 0.01]
    original = [g.copy() for g in grads]
    norm = clip_grad_norm(grads, 1.0)
    assert norm == pytest.approx(math.sqrt(sum((g * g).sum() for g in original)), rel=1e-12)
    for g, g0 in zip(grads, original, strict=True):
        np.testing.assert_array_equal(g, g0)


def test_clip_grad_norm_works_on_model_gradients() -> None:
    model = build_model(
        {"layers": [{"type": "dense", "units": 2}], "loss": "mse"}, (2,), dtype="float64"
    )
    for _, _, g in model.parameters():
        g[...] = 2.0  # six entries: norm sqrt(24)
    norm = clip_grad_norm((g for _, _, g in model.parameters()), 0.5)
    assert norm == pytest.approx(math.sqrt(24.0))
    total = math.sqrt(sum(float((g * g).sum()) for _, _, g in model.parameters()))
    assert total == pytest.approx(0.5, rel=1e-6)


def test_build_optimizer_takes_name_param_grad_triples(rng: np.random.Generator) -> None:
    # build_optimizer accepts plain (name, param, grad) triples, as the workers pass them.
    triples = _triples(rng)
    opt = build_optimizer({"type": "adam", "lr": 0.1}, triples)
    opt.step()
    assert set(opt.state) == {"0.W", "0.b"}
    assert opt.state["0.W"]["exp_avg"].shape == (3, 2)


@pytest.mark.parametrize(
    "spec",
    [
        {"type": "sgd", "lr": 0.1, "momentum": 0.9, "dampening": 0.2, "weight_decay": 0.01},
        {"type": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True},
        {"type": "adam", "lr": 0.01, "weight_decay": 0.1},
        {"type": "adamw", "lr": 0.01},
    ],
    ids=["sgd-dampening-decay", "sgd-nesterov", "adam-l2", "adamw"],
)
def test_large_parameters_updated_piece_by_piece_get_the_same_bits(
    spec: dict[str, Any], rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Odd sizes: the last piece is shorter; the small one is not cut at all.
    shapes = [(3 * optim._CHUNK + 7,), (301, 257), (5,)]
    values = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    steps = [[rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(4)]

    def run(chunk: int) -> list[np.ndarray]:
        monkeypatch.setattr(optim, "_CHUNK", chunk)
        return _run(spec, values, steps)

    for pieces, whole in zip(run(4096), run(0), strict=True):
        np.testing.assert_array_equal(pieces, whole)
