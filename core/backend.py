"""The array module of a model: NumPy on the CPU, CuPy on a GPU."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

DEVICES = ("cpu", "gpu")
DTYPES = ("float32", "float64")


def get_xp(device: str = "cpu") -> ModuleType:
    """The array module for ``device``; CuPy is imported only when asked for."""
    if device == "cpu":
        return np
    if device == "gpu":
        try:
            import cupy
        except ImportError as exc:
            raise RuntimeError(
                "device 'gpu' needs CuPy: pip install 'trainq[gpu]' on a machine with CUDA 12, "
                "'trainq[gpu-cuda13]' with CUDA 13"
            ) from exc
        return cupy
    raise ValueError(f"unknown device {device!r}; expected one of {DEVICES}")


def to_numpy(array: Any) -> np.ndarray:
    """A NumPy array from a NumPy or CuPy array (a no-op for NumPy)."""
    if isinstance(array, np.ndarray):
        return array
    get = getattr(array, "get", None)
    return get() if get is not None else np.asarray(array)


def array_module(array: Any) -> ModuleType:
    """NumPy or CuPy, whichever owns ``array``."""
    if isinstance(array, np.ndarray | np.generic):
        return np
    import cupy  # only reached for a CuPy array

    return cupy
