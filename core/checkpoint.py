"""State as ``.npz`` bytes: arrays only, loaded with ``allow_pickle=False``."""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np


def to_npz_bytes(arrays: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **{name: np.asarray(value) for name, value in arrays.items()})
    return buffer.getvalue()


def from_npz_bytes(data: bytes) -> dict[str, np.ndarray]:
    """Every array of an ``.npz``; object arrays are refused, nothing is unpickled."""
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files}


def encode_json(value: Any) -> np.ndarray:
    """JSON as a uint8 array, so specs and RNG states travel inside an ``.npz``."""
    return np.frombuffer(json.dumps(value, sort_keys=True).encode(), dtype=np.uint8).copy()


def decode_json(array: np.ndarray) -> Any:
    return json.loads(np.asarray(array, dtype=np.uint8).tobytes().decode())


def split_prefix(state: dict[str, Any], prefix: str) -> dict[str, Any]:
    """The entries under ``prefix/``, with the prefix removed."""
    head = prefix + "/"
    return {key[len(head) :]: value for key, value in state.items() if key.startswith(head)}
