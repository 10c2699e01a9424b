"""The engine on a GPU (``device="gpu"``, CuPy) against NumPy on the CPU.

Skips where CuPy or a CUDA device is missing. Needs nothing from the other test
packages' fixtures, so on a machine with only the engine's dependencies it runs
alone: ``pytest --noconftest tests/core/test_gpu.py``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from tests.core.backends import CASES, compare, trainer


def _cupy() -> Any:
    cupy = pytest.importorskip("cupy", reason="CuPy is not installed (pip install 'trainq[gpu]')")
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDA's runtime raises its own error types
        pytest.skip(f"no CUDA device: {exc}")
    if count == 0:
        pytest.skip("no CUDA device")
    return cupy


@pytest.mark.parametrize("name", list(CASES))
def test_gpu_training_gives_the_cpus_numbers(name: str) -> None:
    cupy = _cupy()
    other = trainer(CASES[name], device="gpu")
    assert other.model.xp is cupy
    assert all(isinstance(p, cupy.ndarray) for _, p, _ in other.model.parameters())
    compare(CASES[name], other)


def test_gpu_model_takes_and_gives_numpy_at_its_edges() -> None:
    cupy = _cupy()
    model = trainer(CASES["cnn"], device="gpu").model
    x = np.random.default_rng(0).standard_normal((3, *CASES["cnn"].input_shape), dtype=np.float32)
    out = model.forward(x)
    assert isinstance(out, cupy.ndarray)
    assert all(isinstance(v, np.ndarray) for v in model.state_dict().values())
