"""Running a trained model on inputs sent to the API."""

from __future__ import annotations

from collections import OrderedDict
from threading import Lock
from typing import Any

import numpy as np

from core.backend import to_numpy
from core.checkpoint import decode_json, from_npz_bytes, split_prefix
from core.losses import predictions
from core.model import Model, build_model
from service.artifacts import ArtifactStore
from service.errors import Invalid

MAX_PREDICT_ROWS = 1024
MODEL_CACHE_SIZE = 8


class ModelCache:
    """Built models by artifact hash, least recently used dropped first."""

    def __init__(self, size: int = MODEL_CACHE_SIZE) -> None:
        self.size = size
        self._models: OrderedDict[str, Model] = OrderedDict()
        self._lock = Lock()

    def get(self, store: ArtifactStore, sha256: str, input_shape: tuple[int, ...]) -> Model:
        with self._lock:
            model = self._models.get(sha256)
            if model is not None:
                self._models.move_to_end(sha256)
                return model
        state = from_npz_bytes(store.get(sha256))
        model = build_model(decode_json(state["spec/model"]), input_shape)
        model.load_state_dict(split_prefix(state, "model"))
        with self._lock:
            self._models[sha256] = model
            while len(self._models) > self.size:
                self._models.popitem(last=False)
        return model


def predict(model: Model, inputs: list[Any]) -> tuple[list[Any], list[Any]]:
    """``(outputs, predictions)`` for rows shaped like the dataset's samples."""
    if not inputs:
        raise Invalid(("body", "inputs"), "inputs must hold at least one row")
    if len(inputs) > MAX_PREDICT_ROWS:
        raise Invalid(("body", "inputs"), f"at most {MAX_PREDICT_ROWS} rows per request")
    try:
        x = np.asarray(inputs, dtype=np.float64)
    except (ValueError, TypeError):
        raise Invalid(("body", "inputs"), "inputs must be numeric arrays of equal shape") from None
    expected = tuple(model.input_shape)
    if x.shape[1:] != expected:
        raise Invalid(
            ("body", "inputs"),
            f"each row must have shape {list(expected)}, got {list(x.shape[1:])}",
        )
    if not np.isfinite(x).all():
        raise Invalid(("body", "inputs"), "inputs hold NaN or infinite values")
    outputs = to_numpy(model.forward(x.astype(model.dtype), training=False))
    predicted = to_numpy(predictions(model.spec.loss, outputs))
    return outputs.tolist(), predicted.tolist()
