"""Multi-head self-attention and the pre-norm transformer block.

Sequences travel as ``(batch, time, dim)``. Heads are an axis of their own,
``(batch, heads, time, head_dim)``, so every head is computed by the same
batched matrix product: there is no loop over heads.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from core.layers.activations import GELU
from core.layers.base import Layer, Shape, ShapeError, init_weight
from core.layers.dense import Dense
from core.layers.norm import LayerNorm
from core.spec import DenseSpec, GeluSpec, LayerNormSpec, SelfAttentionSpec

#: A softmax row summing below this after the shared shift has lost precision to
#: underflow (float32's smallest normal is 1.2e-38) and is recomputed with its own maximum.
_UNDERFLOW_SUM = 1e-30


def _need_sequence(layer: str, input_shape: Shape) -> None:
    if len(input_shape) != 2:
        raise ShapeError(
            f"{layer} needs (time, dim) per sample, got {input_shape}; put it after an embedding",
            "type",
        )


class SelfAttention(Layer):
    """Multi-head scaled dot-product self-attention.

    x: (batch, time, dim) -> y: (batch, time, dim); Wq, Wk, Wv, Wo: (dim, dim) applied
    as ``x @ W``; bq, bk, bv, bo: (dim,). With h heads of size d = dim / h:
    q, k, v = x @ Wq + bq, ... split into (batch, h, time, d);
    P = softmax(q k^T / sqrt(d)) (entries above the diagonal masked when causal);
    y = concat_heads(P v) @ Wo + bo.
    """

    type = "self_attention"
    has_weights = True
    _QKV = ("q", "k", "v")

    def __init__(self, spec: Any) -> None:
        super().__init__(spec)
        self._masks: dict[int, Any] = {}
        self._ones: dict[int, Any] = {}

    def _infer(self, input_shape: Shape) -> Shape:
        _need_sequence(self.type, input_shape)
        dim, heads = input_shape[1], self.spec.heads
        if dim % heads:
            raise ShapeError(f"dim {dim} is not divisible by heads={heads}", "heads")
        return input_shape

    def param_shapes(self) -> dict[str, Shape]:
        dim = self.input_shape[-1]
        shapes: dict[str, Shape] = {}
        for name in ("q", "k", "v", "o"):
            shapes[f"W{name}"] = (dim, dim)
            shapes[f"b{name}"] = (dim,)
        return shapes

    def flops(self) -> int:
        time, dim = self.input_shape
        projections = 4 * 2 * time * dim * dim
        scores_and_mix = 2 * 2 * time * time * dim
        softmax = 5 * self.spec.heads * time * time
        return projections + scores_and_mix + softmax

    def _initial_value(self, name: str, shape: Shape, rng: np.random.Generator, *, he: bool):
        return init_weight(shape, rng, he=False) if name.startswith("W") else np.zeros(shape)

    def _causal_mask(self, time: int, dtype: Any) -> Any:
        """(time, time): 0 on and below the diagonal, -inf above (the future)."""
        mask = self._masks.get(time)
        if mask is None or mask.dtype != dtype:
            above = np.triu(np.ones((time, time), dtype=bool), k=1)
            mask = self.xp.asarray(np.where(above, -np.inf, 0.0).astype(dtype))
            self._masks[time] = mask
        return mask

    def _row_sums(self, a: Any) -> Any:
        """Sums over the last axis, keepdims, as one matrix product with a column of ones.

        A reduction along a short contiguous axis is several times slower in NumPy.
        """
        n = a.shape[-1]
        ones = self._ones.get(n)
        if ones is None or ones.dtype != a.dtype:
            ones = self._ones[n] = self.xp.ones((n, 1), dtype=a.dtype)
        return (a.reshape(-1, n) @ ones).reshape(*a.shape[:-1], 1)

    def _softmax(self, scores: Any, mask: Any | None) -> Any:
        """Softmax over the last axis of ``scores`` (plus ``mask``, 0 or -inf, when given).

        Any shift common to a row leaves its softmax unchanged, and one maximum over
        all rows costs far less than a maximum per row (and folds into the mask).
        A row whose entries all lie far below that maximum would underflow; such
        rows (rare) are redone with their own maximum.
        """
        xp = self.xp
        top = scores.max()
        shifted = scores - top if mask is None else scores + (mask - top)
        probs = xp.exp(shifted, out=shifted)
        sums = self._row_sums(probs)
        if float(sums.min()) < _UNDERFLOW_SUM:
            if mask is not None:
                scores = scores + mask
            probs = xp.exp(scores - scores.max(axis=-1, keepdims=True))
            sums = self._row_sums(probs)
        probs /= sums  # a division, so a row with a single entry is exactly 1
        return probs

    def forward(self, x: Any, training: bool) -> Any:
        xp = self.xp
        params = self.params
        batch, time, dim = x.shape
        heads = self.spec.heads
        head_dim = dim // heads
        scale = 1.0 / math.sqrt(head_dim)
        # One product for the three projections, x @ [Wq*s | Wk | Wv] with s = 1/sqrt(d):
        # scaling the (dim, dim) weight costs less than scaling q or the scores.
        w_qkv = xp.concatenate((params["Wq"], params["Wk"], params["Wv"]), axis=1)
        w_qkv[:, :dim] *= scale
        # bk adds q.bk to every score of a query's row, a shift softmax ignores: leaving it
        # out changes no output, and makes y exactly (not just nearly) independent of bk.
        b_qkv = xp.concatenate((params["bq"] * scale, xp.zeros_like(params["bk"]), params["bv"]))
        x2 = x.reshape(batch * time, dim)
        qkv = x2 @ w_qkv
        qkv += b_qkv
        # Views (batch, heads, time, d) into qkv; q is already scaled.
        q, k, v = qkv.reshape(batch, time, 3, heads, head_dim).transpose(2, 0, 3, 1, 4)
        scores = q @ k.swapaxes(-1, -2)  # (batch, heads, time, time)
        mask = self._causal_mask(time, scores.dtype) if self.spec.causal else None
        probs = self._softmax(scores, mask)
        merged = xp.empty((batch, time, dim), dtype=probs.dtype)
        # P v, written straight into the heads-concatenated layout (batch, time, heads, d)
        xp.matmul(probs, v, out=merged.reshape(batch, time, heads, head_dim).transpose(0, 2, 1, 3))
        merged = merged.reshape(batch * time, dim)
        y = merged @ params["Wo"]
        y += params["bo"]
        self._x2, self._w_qkv = x2, w_qkv
        self._q, self._k, self._v, self._probs, self._merged = q, k, v, probs, merged
        return y.reshape(batch, time, dim)

    def backward(self, dy: Any) -> Any:
        xp = self.xp
        batch, time, dim = dy.shape
        heads = self.spec.heads
        head_dim = dim // heads
        scale = 1.0 / math.sqrt(head_dim)
        q, k, v, probs, merged = self._q, self._k, self._v, self._probs, self._merged
        dy2 = dy.reshape(batch * time, dim)
        self._accumulate_matmul("Wo", merged.T, dy2)  # dWo = merged.T @ dy
        self._accumulate("bo", dy2.sum(axis=0))
        dmerged = dy2 @ self.params["Wo"].T  # (batch*time, dim)
        # rowsum(dP * P) = rowsum(dO * O): a sum over d instead of over time.
        delta = self._row_sums((dmerged * merged).reshape(batch, time, heads, head_dim))
        delta = xp.ascontiguousarray(delta.transpose(0, 2, 1, 3))  # (batch, heads, time, 1)
        dmixed = dmerged.reshape(batch, time, heads, head_dim).transpose(0, 2, 1, 3)
        dqkv = xp.empty((batch, time, 3, heads, head_dim), dtype=dy.dtype)
        dq, dk, dv = dqkv.transpose(2, 0, 3, 1, 4)  # views into dqkv
        xp.matmul(probs.swapaxes(-1, -2), dmixed, out=dv)  # dV = P^T dO
        dscores = dmixed @ v.swapaxes(-1, -2)  # dP = dO V^T
        # softmax backward: dS = P * (dP - rowsum(dP * P))
        dscores -= delta
        dscores *= probs
        xp.matmul(dscores.swapaxes(-1, -2), q, out=dk)  # dK = dS^T (q s)
        xp.matmul(dscores, k, out=dq)  # d(q s) = dS K
        dqkv2 = dqkv.reshape(batch * time, 3 * dim)
        dw_qkv = self._x2.T @ dqkv2  # d[Wq*s | Wk | Wv] = x.T @ d[q*s | k | v]
        db_qkv = dqkv2.sum(axis=0)  # its k part, dbk, is zero up to rounding (see forward)
        for i, name in enumerate(self._QKV):
            part = slice(i * dim, (i + 1) * dim)
            if name == "q":  # q*s = x @ (Wq*s) + bq*s, so dWq = s * x.T @ d(q*s)
                self._accumulate("Wq", dw_qkv[:, part] * scale)
                self._accumulate("bq", db_qkv[part] * scale)
            else:
                self._accumulate(f"W{name}", dw_qkv[:, part])
                self._accumulate(f"b{name}", db_qkv[part])
        self._grads_done()
        if not self.needs_input_grad:
            return None
        return (dqkv2 @ self._w_qkv.T).reshape(batch, time, dim)  # dx = d[q|k|v] @ W_qkv.T


class TransformerBlock(Layer):
    """A pre-norm transformer block: ``h = x + attn(ln1(x))``, ``y = h + mlp2(gelu(mlp1(ln2(h))))``.

    x: (batch, time, dim) -> y: (batch, time, dim); the MLP's hidden width is
    ``round(mlp_ratio * dim)``. Parameter keys are flat, prefixed by the part they belong to:
    ``ln1.gamma``, ``ln1.beta``; ``attn.Wq``, ``attn.bq``, ``attn.Wk``, ``attn.bk``,
    ``attn.Wv``, ``attn.bv``, ``attn.Wo``, ``attn.bo``; ``ln2.gamma``, ``ln2.beta``;
    ``mlp1.W`` (dim, hidden), ``mlp1.b``; ``mlp2.W`` (hidden, dim), ``mlp2.b``.
    Backward: the residual adds pass dy through unchanged, so dh = dy + d(mlp branch)
    and dx = dh + d(attention branch).
    """

    type = "transformer_block"
    has_weights = True

    def __init__(self, spec: Any) -> None:
        super().__init__(spec)
        self.ln1 = LayerNorm(LayerNormSpec(type="layernorm"))
        self.attn = SelfAttention(
            SelfAttentionSpec(type="self_attention", heads=spec.heads, causal=spec.causal)
        )
        self.ln2 = LayerNorm(LayerNormSpec(type="layernorm"))
        self.gelu = GELU(GeluSpec(type="gelu"))
        self.parts: dict[str, Layer] = {"ln1": self.ln1, "attn": self.attn, "ln2": self.ln2}

    def _infer(self, input_shape: Shape) -> Shape:
        _need_sequence(self.type, input_shape)
        time, dim = input_shape
        hidden = max(1, round(self.spec.mlp_ratio * dim))
        self.mlp1 = Dense(DenseSpec(type="dense", units=hidden))
        self.mlp2 = Dense(DenseSpec(type="dense", units=dim))
        self.parts.update({"mlp1": self.mlp1, "mlp2": self.mlp2})
        self.ln1.infer(input_shape)
        self.attn.infer(input_shape)
        self.ln2.infer(input_shape)
        self.mlp1.infer(input_shape)
        self.gelu.infer((time, hidden))
        self.mlp2.infer((time, hidden))
        return input_shape

    def param_shapes(self) -> dict[str, Shape]:
        return {
            f"{prefix}.{key}": shape
            for prefix, part in self.parts.items()
            for key, shape in part.param_shapes().items()
        }

    def flops(self) -> int:
        time, dim = self.input_shape
        residual_adds = 2 * time * dim
        return residual_adds + self.gelu.flops() + sum(p.flops() for p in self.parts.values())

    def init(self, xp: Any, dtype: Any, rng: np.random.Generator, *, he: bool) -> None:
        self.xp = xp
        self.dtype = np.dtype(dtype)
        self.gelu.xp, self.gelu.dtype = xp, self.dtype
        for prefix, part in self.parts.items():
            part.init(xp, dtype, rng, he=False)
            for key in part.params:
                self.params[f"{prefix}.{key}"] = part.params[key]
                self.grads[f"{prefix}.{key}"] = part.grads[key]

    def _link_parts(self) -> None:
        """Point each part at the block's arrays, which an optimizer or a loader may replace."""
        for prefix, part in self.parts.items():
            for key in part.params:
                part.params[key] = self.params[f"{prefix}.{key}"]
                part.grads[key] = self.grads[f"{prefix}.{key}"]

    def zero_grad(self) -> None:
        super().zero_grad()
        for part in self.parts.values():
            part.zero_grad()

    def backward_no_samples(self) -> None:
        self._link_parts()
        for part in self.parts.values():
            part.backward_no_samples()
        self._grads_done()

    def forward(self, x: Any, training: bool) -> Any:
        self._link_parts()
        h = self.attn.forward(self.ln1.forward(x, training), training)
        h += x
        mlp = self.mlp1.forward(self.ln2.forward(h, training), training)
        y = self.mlp2.forward(self.gelu.forward(mlp, training), training)
        y += h
        return y

    def backward(self, dy: Any) -> Any:
        dmlp = self.mlp1.backward(self.gelu.backward(self.mlp2.backward(dy)))
        dh = self.ln2.backward(dmlp)
        dh += dy
        dx = self.ln1.backward(self.attn.backward(dh))
        dx += dh
        self._grads_done()
        return dx
