"""A training step split over threads (``Trainer(threads=N)``): each part's gradients, added
in order, the same numbers every time, whatever layers the model has."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
from threadpoolctl import threadpool_info, threadpool_limits

import core
from tests.core import backends

STEP = {"steps_per_epoch": backends.STEPS, "total_steps": backends.STEPS}


def _without_batchnorm(case: backends.Case) -> backends.Case:
    layers = [layer for layer in case.spec["layers"] if layer["type"] != "batchnorm"]
    return dataclasses.replace(case, spec={**case.spec, "layers": layers})


#: The backend models, every layer type but batchnorm (which keeps the batch whole).
SPLIT_CASES = {name: _without_batchnorm(case) for name, case in backends.CASES.items()}


def _reference_step(trainer: core.Trainer, x: Any, y: Any, parts: int) -> float:
    """What a step split into ``parts`` computes, one part after the other on this
    thread: each part's gradients alone (its share of the batch, its own random key),
    added in part order, then the update."""
    n = len(x)
    bounds = [n * i // parts for i in range(parts + 1)]
    total: list[np.ndarray] = []
    loss_sum = 0.0
    for i in range(parts):
        lo, hi = bounds[i], bounds[i + 1]
        trainer.model.zero_grad()
        loss_sum += trainer.compute_gradients(
            x[lo:hi], y[lo:hi], scale=(hi - lo) / n, rng_key=(i,)
        ).loss_sum
        grads = [g.copy() for _, _, g in trainer.model.parameters()]
        total = grads if not total else [t + g for t, g in zip(total, grads, strict=True)]
    for (_, _, grad), value in zip(trainer.model.parameters(), total, strict=True):
        grad[...] = value
    trainer.apply_gradients(**STEP, diagnose=True)
    return loss_sum


@pytest.mark.parametrize("case_id", list(SPLIT_CASES))
@pytest.mark.parametrize("threads", [2, 3])
def test_a_step_in_parts_adds_the_parts_gradients_in_order(case_id: str, threads: int) -> None:
    case = SPLIT_CASES[case_id]
    threaded, reference = backends.trainer(case, threads=threads), backends.trainer(case, threads=1)
    assert threaded.parts_for(backends.BATCH) == threads
    with threadpool_limits(1, user_api="blas"):  # each part's products on one thread
        for step, (x, y) in enumerate(backends._batches(case, seed=0)):
            got = threaded.train_step(x, y, **STEP, diagnose=True)
            want = _reference_step(reference, x, y, threads)
            assert got.samples == len(x)
            assert got.loss_sum == pytest.approx(want, rel=1e-6), f"loss, step {step}"
            for (name, p, g), (_, q, h) in zip(
                threaded.model.parameters(), reference.model.parameters(), strict=True
            ):
                np.testing.assert_array_equal(g, h, err_msg=f"{name} gradient, step {step}")
                np.testing.assert_array_equal(p, q, err_msg=f"{name}, step {step}")
    assert threaded.epoch_diagnostics() == reference.epoch_diagnostics()


def test_a_split_step_computes_the_same_numbers_every_time() -> None:
    case = backends.CASES["char-lm"]
    runs = []
    for _ in range(2):
        trainer = backends.trainer(case, threads=2)
        for x, y in backends._batches(case, seed=1):
            trainer.train_step(x, y, **STEP)
        runs.append(trainer.model.state_dict())
    for name, value in runs[0].items():
        np.testing.assert_array_equal(runs[1][name], value, err_msg=name)


def test_running_statistics_keep_the_batch_whole() -> None:
    """Batchnorm normalises over the whole batch: its model is not split, and computes
    what one thread does."""
    case = backends.CASES["cnn"]
    threaded, single = backends.trainer(case, threads=2), backends.trainer(case, threads=1)
    assert threaded.parts_for(backends.BATCH) == 1
    for x, y in backends._batches(case, seed=0):
        threaded.train_step(x, y, **STEP)
        single.train_step(x, y, **STEP)
    for name, value in single.model.state_dict().items():
        np.testing.assert_array_equal(threaded.model.state_dict()[name], value, err_msg=name)


def test_no_more_parts_than_samples_and_the_blas_threads_restored() -> None:
    case = SPLIT_CASES["mlp"]
    trainer = backends.trainer(case, threads=4)
    assert trainer.parts_for(3) == 3
    assert trainer.parts_for(1) == 1
    x, y = backends._batches(case, seed=0)[0]
    before = [(lib["filepath"], lib["num_threads"]) for lib in threadpool_info()]
    stats = trainer.train_step(x[:3], y[:3], **STEP)
    assert stats.samples == 3
    assert [(lib["filepath"], lib["num_threads"]) for lib in threadpool_info()] == before


def test_threads_must_be_positive() -> None:
    case = backends.CASES["mlp"]
    with pytest.raises(ValueError, match="threads must be at least 1"):
        backends.trainer(case, threads=0)
