"""Running a trained model on inputs sent to the API."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from threading import Lock
from typing import Any

import numpy as np

from core.backend import to_numpy
from core.checkpoint import decode_json, from_npz_bytes, split_prefix
from core.losses import predictions
from core.model import Model, build_model
from core.text import (
    PAD_ID,
    SPECIAL_TOKENS,
    Tokenizer,
    encode_batch,
    generate,
    tokenizer_from_state,
)
from service.artifacts import ArtifactStore
from service.errors import Invalid

MAX_PREDICT_ROWS = 1024
MODEL_CACHE_SIZE = 8


@dataclass(frozen=True)
class LoadedModel:
    model: Model
    #: A text model's vocabulary, saved with its weights.
    tokenizer: Tokenizer | None


class ModelCache:
    """Built models by artifact hash, least recently used dropped first."""

    def __init__(self, size: int = MODEL_CACHE_SIZE) -> None:
        self.size = size
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()
        self._lock = Lock()

    def get(self, store: ArtifactStore, sha256: str, input_shape: tuple[int, ...]) -> LoadedModel:
        with self._lock:
            loaded = self._models.get(sha256)
            if loaded is not None:
                self._models.move_to_end(sha256)
                return loaded
        state = from_npz_bytes(store.get(sha256))
        model = build_model(decode_json(state["spec/model"]), input_shape)
        model.load_state_dict(split_prefix(state, "model"))
        loaded = LoadedModel(model=model, tokenizer=tokenizer_from_state(state))
        with self._lock:
            self._models[sha256] = loaded
            while len(self._models) > self.size:
                self._models.popitem(last=False)
        return loaded


def predict(
    loaded: LoadedModel, inputs: list[Any], *, max_new_tokens: int = 0, temperature: float = 0.0
) -> tuple[list[Any], list[Any]]:
    """``(outputs, predictions)`` for rows shaped like the dataset's samples, or for
    texts when the model was trained on text. A language model's prediction is the
    continuation of each text (``max_new_tokens``, greedy at temperature 0)."""
    if not inputs:
        raise Invalid(("body", "inputs"), "inputs must hold at least one row")
    if len(inputs) > MAX_PREDICT_ROWS:
        raise Invalid(("body", "inputs"), f"at most {MAX_PREDICT_ROWS} rows per request")
    model = loaded.model
    if loaded.tokenizer is not None:
        return _predict_texts(loaded, inputs, max_new_tokens, temperature)
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


def _predict_texts(
    loaded: LoadedModel, inputs: list[Any], max_new_tokens: int, temperature: float
) -> tuple[list[Any], list[Any]]:
    model, tokenizer = loaded.model, loaded.tokenizer
    assert tokenizer is not None
    if not all(isinstance(text, str) for text in inputs):
        raise Invalid(("body", "inputs"), "this model was trained on text: inputs must be strings")
    (length,) = model.input_shape
    if len(model.output_shape) == 2:  # (time, vocab): a language model
        outputs, continuations = [], []
        for index, text in enumerate(inputs):
            ids = np.asarray(tokenizer.encode(text)[-length:], dtype=np.int64)
            if ids.size == 0:
                ids = np.asarray([PAD_ID])
            logits = to_numpy(model.forward(ids[None, :], training=False))[0, -1]
            outputs.append(logits.tolist())
            if max_new_tokens:
                text_out = generate(
                    model,
                    tokenizer,
                    text,
                    max_new_tokens=max_new_tokens,
                    temperature=temperature,
                    seed=index,
                )
            else:
                text_out = tokenizer.decode(
                    [int(np.argmax(logits[len(SPECIAL_TOKENS) :])) + len(SPECIAL_TOKENS)]
                )
            continuations.append(text_out)
        return outputs, continuations
    logits = to_numpy(model.forward(encode_batch(tokenizer, inputs, length), training=False))
    return logits.tolist(), to_numpy(predictions(model.spec.loss, logits)).tolist()
