"""Layers of token sequences: token and position embeddings, and pooling over time.

Text models take token ids ``(batch, time)`` (integers) and carry vectors
``(batch, time, dim)`` between layers.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from core.layers.base import Layer, Shape, ShapeError, mean_of_rows, spread_over_rows

#: Learned position vectors start small, as in GPT-2, so that early in training
#: the token identity dominates the sum and positions are learned as needed.
POSITION_INIT_STD = 0.02


def scatter_rows(xp: Any, grad: Any, ids: Any, rows: Any, *, overwrite: bool) -> None:
    """``grad[ids[i]] += rows[i]`` for every i, repeated ids summed.

    grad: (vocab, dim); ids: (n,) integers; rows: (n, dim). With ``overwrite``
    every row of ``grad`` that no id names is set to zero first.

    On NumPy the ids are sorted once and each run of equal ids summed with
    ``add.reduceat``: several times faster than ``np.add.at`` and, unlike a
    one-hot product, linear in ``n`` whatever the vocabulary size.
    """
    if xp is not np:
        if overwrite:
            grad.fill(0)
        xp.add.at(grad, ids, rows)
        return
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    is_start = np.empty(sorted_ids.shape, dtype=bool)
    is_start[0] = True
    np.not_equal(sorted_ids[1:], sorted_ids[:-1], out=is_start[1:])
    starts = np.flatnonzero(is_start)
    sums = np.add.reduceat(rows[order], starts, axis=0)
    unique_ids = sorted_ids[starts]
    if overwrite:
        grad.fill(0)
        grad[unique_ids] = sums
    else:
        grad[unique_ids] += sums  # ids are unique here, so fancy += adds each once


class Embedding(Layer):
    """A table lookup: ``y[b, t] = W[x[b, t]]``.

    x: (batch, time) integer ids in [0, vocab_size) -> y: (batch, time, dim);
    W: (vocab_size, dim), drawn from N(0, 1) as ``torch.nn.Embedding``.
    dW[v] = sum of dy[b, t] over the positions where x[b, t] == v; ids get no gradient.
    """

    type = "embedding"
    has_weights = True
    #: The model feeds this layer integer ids instead of casting its input to floats.
    takes_token_ids = True

    def _infer(self, input_shape: Shape) -> Shape:
        if len(input_shape) != 1:
            raise ShapeError(
                f"embedding needs token ids of shape (time,) per sample, got {input_shape}",
                "type",
            )
        return (input_shape[0], self.spec.dim)

    def param_shapes(self) -> dict[str, Shape]:
        return {"W": (self.spec.vocab_size, self.spec.dim)}

    def flops(self) -> int:
        return 0  # a gather, no arithmetic

    def _initial_value(self, name: str, shape: Shape, rng: np.random.Generator, *, he: bool):
        return rng.standard_normal(shape)

    def check_ids(self, ids: Any) -> None:
        """Raise ``ValueError`` unless every id lies in [0, vocab_size)."""
        if ids.size == 0:
            return
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= self.spec.vocab_size:
            bad = low if low < 0 else high
            raise ValueError(
                f"token id {bad} is out of range: the embedding has vocab_size "
                f"{self.spec.vocab_size}, so ids must lie in [0, {self.spec.vocab_size - 1}]"
            )

    def forward(self, x: Any, training: bool) -> Any:
        self._ids = x
        return self.params["W"][x]

    def backward(self, dy: Any) -> None:
        dim = dy.shape[-1]
        scatter_rows(
            self.xp,
            self.grads["W"],
            self._ids.reshape(-1),
            dy.reshape(-1, dim),
            overwrite=self._overwrite_grads,
        )
        self._grads_done()
        return None


class PositionalEmbedding(Layer):
    """Learned absolute positions added to the input: ``y[b, t] = x[b, t] + W[t]``.

    x: (batch, time, dim) -> y: same shape; W: (max_len, dim), time <= max_len.
    dx = dy;  dW[t] = sum_b dy[b, t] (zero for t >= time).
    """

    type = "positional_embedding"
    has_weights = True

    def _infer(self, input_shape: Shape) -> Shape:
        if len(input_shape) != 2:
            raise ShapeError(
                f"positional_embedding needs (time, dim) per sample, got {input_shape}; "
                "put it after an embedding",
                "type",
            )
        if input_shape[0] > self.spec.max_len:
            raise ShapeError(
                f"sequences have {input_shape[0]} positions but max_len is {self.spec.max_len}",
                "max_len",
            )
        return input_shape

    def param_shapes(self) -> dict[str, Shape]:
        return {"W": (self.spec.max_len, self.input_shape[-1])}

    def _initial_value(self, name: str, shape: Shape, rng: np.random.Generator, *, he: bool):
        return rng.normal(0.0, POSITION_INIT_STD, size=shape)

    def forward(self, x: Any, training: bool) -> Any:
        time = x.shape[1]
        if time > self.spec.max_len:
            raise ValueError(
                f"positional_embedding got {time} positions but max_len is {self.spec.max_len}"
            )
        self._time = time
        return x + self.params["W"][:time]

    def backward(self, dy: Any) -> Any:
        time = self._time
        grad = self.grads["W"]
        if self._overwrite_grads:
            dy.sum(axis=0, out=grad[:time])
            grad[time:] = 0
        else:
            grad[:time] += dy.sum(axis=0)
        self._grads_done()
        return dy


class MeanPool(Layer):
    """Mean over time: ``y[b] = mean_t x[b, t]``.

    x: (batch, time, dim) -> y: (batch, dim);  dx[b, t] = dy[b] / time.
    """

    type = "mean_pool"

    def _infer(self, input_shape: Shape) -> Shape:
        if len(input_shape) != 2:
            raise ShapeError(f"mean_pool needs (time, dim) per sample, got {input_shape}", "type")
        return (input_shape[1],)

    def flops(self) -> int:
        return self.input_shape[0] * self.input_shape[1]

    def forward(self, x: Any, training: bool) -> Any:
        self._x_shape = x.shape
        return mean_of_rows(x)

    def backward(self, dy: Any) -> Any:
        return spread_over_rows(self.xp, dy, self._x_shape[1])
