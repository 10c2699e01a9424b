"""The engine's array-module-generic code, run on the CPU.

Layers branch on ``xp is np`` where NumPy has a faster way (void-dtype block copies,
sorted segment sums, a fused float32 GELU); CuPy takes the other branch. Here that
branch runs on NumPy behind a module that is not ``numpy``, and must give NumPy's
numbers. ``test_gpu.py`` runs the same comparisons with CuPy on a GPU.
"""

from __future__ import annotations

import types
from typing import Any

import numpy as np
import pytest

import core.model
from core.layers import LAYERS
from core.losses import LOSSES
from core.optim import OPTIMIZERS
from tests.core.backends import CASES, compare, trainer


class _GenericNumPy(types.ModuleType):
    """NumPy under another module object: ``xp is np`` is false for it."""

    def __getattr__(self, name: str) -> Any:
        return getattr(np, name)


GENERIC = _GenericNumPy("generic_numpy")


@pytest.mark.parametrize("name", list(CASES))
def test_generic_array_code_gives_numpys_numbers(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with monkeypatch.context() as patch:  # this model alone gets the generic module
        patch.setattr(core.model, "get_xp", lambda device: GENERIC)
        other = trainer(CASES[name])
    assert other.model.xp is GENERIC
    assert all(layer.xp is GENERIC for layer in other.model.layers)
    compare(CASES[name], other)


def test_the_generic_module_is_not_numpy() -> None:
    assert GENERIC is not np
    assert GENERIC.float32 is np.float32


def test_the_cases_cover_every_layer_loss_and_optimizer() -> None:
    layers = {layer["type"] for case in CASES.values() for layer in case.spec["layers"]}
    assert layers == set(LAYERS)
    assert {case.spec["loss"] for case in CASES.values()} == set(LOSSES)
    assert {case.optimizer["type"] for case in CASES.values()} == set(OPTIMIZERS)


def test_devices_name_what_they_need() -> None:
    from core.backend import get_xp

    assert get_xp("cpu") is np
    with pytest.raises(ValueError, match=r"unknown device 'tpu'; expected one of \('cpu', 'gpu'\)"):
        get_xp("tpu")
    try:
        import cupy  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match=r"trainq\[gpu\].*CUDA 12.*trainq\[gpu-cuda13\]"):
            get_xp("gpu")
