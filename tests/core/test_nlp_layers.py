"""Text layers: embeddings, self-attention, the transformer block, pooling over time.

Gradients against central differences in float64; values and gradients against
PyTorch (``scaled_dot_product_attention``, ``nn.Embedding``) when it is installed;
the spec checks and the model's handling of integer token ids.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from core import SpecError, build_model, loss, summarize
from core.gradcheck import check_layer, check_loss, numeric_grad
from core.losses import correct_count, softmax_cross_entropy
from tests.factories import make_layer

# Central differences with eps=1e-6 in float64 leave about 1e-9 of round-off.
GRAD_TOL = 1e-5
TORCH_RTOL = 1e-5
TORCH_ATOL = 1e-10


def char_lm_spec(vocab: int, *, dim: int = 8, heads: int = 2, context: int = 6, blocks: int = 2):
    """embedding, positions, transformer blocks, layernorm, dense to the vocabulary."""
    return {
        "layers": [
            {"type": "embedding", "vocab_size": vocab, "dim": dim},
            {"type": "positional_embedding", "max_len": context},
            *[{"type": "transformer_block", "heads": heads} for _ in range(blocks)],
            {"type": "layernorm"},
            {"type": "dense", "units": vocab},
        ],
        "loss": "softmax_cross_entropy",
    }


def _forward_backward(layer: Any, x: np.ndarray, dy: np.ndarray):
    layer.zero_grad()
    y = layer.forward(x, True)
    dx = layer.backward(dy)
    return y, dx, {k: np.array(g) for k, g in layer.grads.items()}


# --- gradients against central differences -------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "input_shape"),
    [
        ({"type": "self_attention", "heads": 1}, (4, 3)),
        ({"type": "self_attention", "heads": 3}, (5, 6)),
        ({"type": "self_attention", "heads": 3, "causal": True}, (5, 6)),
        ({"type": "self_attention", "heads": 2, "causal": True}, (1, 4)),
        ({"type": "transformer_block", "heads": 2}, (4, 6)),
        ({"type": "transformer_block", "heads": 3, "causal": False, "mlp_ratio": 1.5}, (3, 6)),
        ({"type": "positional_embedding", "max_len": 9}, (4, 3)),
        ({"type": "mean_pool"}, (5, 3)),
    ],
    ids=lambda v: v.get("type") if isinstance(v, dict) else str(v),
)
def test_gradients_match_central_differences(
    spec: dict[str, Any], input_shape: tuple[int, ...], rng: np.random.Generator
) -> None:
    layer = make_layer(spec, input_shape, rng=rng)
    x = rng.standard_normal((3, *input_shape))
    errors = check_layer(layer, x)
    assert set(errors) == {"x", *layer.params}
    assert max(errors.values()) < GRAD_TOL, errors


def test_embedding_gradient_sums_repeated_ids(rng: np.random.Generator) -> None:
    layer = make_layer({"type": "embedding", "vocab_size": 6, "dim": 3}, (5,), rng=rng, first=True)
    ids = np.array([[0, 2, 2, 5, 2], [5, 0, 2, 2, 2]])  # ids 1, 3 and 4 never occur
    errors = check_layer(layer, ids)
    assert set(errors) == {"W"} and errors["W"] < GRAD_TOL
    dy = rng.standard_normal((2, 5, 3))
    y, dx, grads = _forward_backward(layer, ids, dy)
    assert dx is None
    np.testing.assert_array_equal(y, layer.params["W"][ids])
    expected = np.zeros((6, 3))
    for b in range(2):
        for t in range(5):
            expected[ids[b, t]] += dy[b, t]
    np.testing.assert_allclose(grads["W"], expected, rtol=1e-12, atol=1e-14)
    assert not grads["W"][[1, 3, 4]].any()


def test_positional_embedding_leaves_positions_past_the_sequence_untouched(
    rng: np.random.Generator,
) -> None:
    layer = make_layer({"type": "positional_embedding", "max_len": 7}, (7, 2), rng=rng)
    x = rng.standard_normal((3, 4, 2))  # shorter than max_len, as in generation
    dy = rng.standard_normal(x.shape)
    y, dx, grads = _forward_backward(layer, x, dy)
    np.testing.assert_allclose(y, x + layer.params["W"][:4])
    np.testing.assert_array_equal(dx, dy)
    np.testing.assert_allclose(grads["W"][:4], dy.sum(axis=0))
    assert not grads["W"][4:].any()


def test_key_bias_has_no_effect_and_no_gradient(rng: np.random.Generator) -> None:
    """Softmax ignores a shift shared by a row; q.bk is one, so y does not depend on bk."""
    layer = make_layer({"type": "self_attention", "heads": 2}, (4, 4), rng=rng)
    x = rng.standard_normal((2, 4, 4))
    dy = rng.standard_normal(x.shape)
    y, _, grads = _forward_backward(layer, x, dy)
    layer.params["bk"] = layer.params["bk"] + 3.0
    np.testing.assert_array_equal(layer.forward(x, True), y)
    np.testing.assert_allclose(grads["bk"], 0.0, atol=1e-12)


def test_causal_attention_ignores_the_future(rng: np.random.Generator) -> None:
    layer = make_layer({"type": "self_attention", "heads": 2, "causal": True}, (6, 4), rng=rng)
    x = rng.standard_normal((2, 6, 4))
    later = x.copy()
    later[:, 3:] = rng.standard_normal((2, 3, 4))
    y, y_later = layer.forward(x, False), layer.forward(later, False)
    np.testing.assert_allclose(y[:, :3], y_later[:, :3], rtol=1e-12, atol=1e-14)
    assert not np.allclose(y[:, 3:], y_later[:, 3:])
    # The gradient of the first outputs reaches no later input.
    dy = np.zeros_like(x)
    dy[:, :3] = rng.standard_normal((2, 3, 4))
    layer.forward(x, True)
    layer.zero_grad()
    dx = layer.backward(dy)
    assert not dx[:, 3:].any()


def test_attention_softmax_survives_rows_far_below_the_others(rng: np.random.Generator) -> None:
    """Rows whose scores all lie far below the largest score still get a proper softmax."""
    layer = make_layer({"type": "self_attention", "heads": 1}, (3, 2), rng=rng)
    layer.params["Wq"] = np.eye(2) * 30.0
    layer.params["Wk"] = np.eye(2) * 30.0
    x = np.array([[[1.0, 0.0], [1.0, 0.0], [0.0, 0.02]], [[0.0, 0.02], [0.0, 0.01], [0.0, 0.0]]])
    y = layer.forward(x, False)
    assert np.isfinite(y).all()
    # The reference: the same attention with a maximum per row.
    q, k = x @ layer.params["Wq"] + layer.params["bq"], x @ layer.params["Wk"]
    v = x @ layer.params["Wv"] + layer.params["bv"]
    scores = q @ k.transpose(0, 2, 1) / math.sqrt(2)
    p = np.exp(scores - scores.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    np.testing.assert_allclose(y, (p @ v) @ layer.params["Wo"] + layer.params["bo"], rtol=1e-10)


def test_transformer_block_parameter_keys_and_shapes() -> None:
    layer = make_layer({"type": "transformer_block", "heads": 2, "mlp_ratio": 3}, (5, 4))
    shapes = {key: value.shape for key, value in layer.params.items()}
    assert shapes == {
        "ln1.gamma": (4,), "ln1.beta": (4,),
        "attn.Wq": (4, 4), "attn.bq": (4,), "attn.Wk": (4, 4), "attn.bk": (4,),
        "attn.Wv": (4, 4), "attn.bv": (4,), "attn.Wo": (4, 4), "attn.bo": (4,),
        "ln2.gamma": (4,), "ln2.beta": (4,),
        "mlp1.W": (4, 12), "mlp1.b": (12,), "mlp2.W": (12, 4), "mlp2.b": (4,),
    }  # fmt: skip
    assert set(layer.grads) == set(layer.params)


def test_transformer_block_uses_replaced_parameter_arrays(rng: np.random.Generator) -> None:
    """A loader or optimizer may put new arrays into ``params``; the block must use them."""
    layer = make_layer({"type": "transformer_block", "heads": 2}, (3, 4), rng=rng)
    x = rng.standard_normal((2, 3, 4))
    before = layer.forward(x, False)
    layer.params["mlp2.b"] = layer.params["mlp2.b"] + 1.0
    np.testing.assert_allclose(layer.forward(x, False), before + 1.0, rtol=1e-12)


# --- per-token cross-entropy ----------------------------------------------------------------


def test_per_token_cross_entropy_and_accuracy(rng: np.random.Generator) -> None:
    logits = rng.standard_normal((3, 4, 5))
    labels = rng.integers(0, 5, size=(3, 4))
    value, grad = softmax_cross_entropy(logits, labels)
    log_p = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
    expected = -np.mean(np.take_along_axis(log_p, labels[..., None], axis=-1))
    assert value == pytest.approx(expected, rel=1e-12)
    assert grad.shape == logits.shape
    assert check_loss(softmax_cross_entropy, logits, labels) < GRAD_TOL
    right, predicted = correct_count("softmax_cross_entropy", logits, labels)
    assert predicted == 12
    assert right == int((logits.argmax(axis=-1) == labels).sum())


# --- specs and the model's handling of token ids --------------------------------------------


@pytest.mark.parametrize(
    ("layers", "input_shape", "layer", "field"),
    [
        ([{"type": "embedding", "vocab_size": 9, "dim": 6},
          {"type": "self_attention", "heads": 4}], (5,), 1, "heads"),
        ([{"type": "embedding", "vocab_size": 9, "dim": 6},
          {"type": "transformer_block", "heads": 5}], (5,), 1, "heads"),
        ([{"type": "embedding", "vocab_size": 9, "dim": 6},
          {"type": "positional_embedding", "max_len": 4}], (5,), 1, "max_len"),
        ([{"type": "dense", "units": 4},
          {"type": "embedding", "vocab_size": 9, "dim": 6}], (5,), 1, "type"),
        ([{"type": "embedding", "vocab_size": 9, "dim": 6}], (2, 5), 0, "type"),
        ([{"type": "embedding", "vocab_size": 1, "dim": 6}], (5,), 0, "vocab_size"),
        ([{"type": "embedding", "vocab_size": 9, "dim": 0}], (5,), 0, "dim"),
        ([{"type": "embedding", "vocab_size": 9, "dim": 6},
          {"type": "self_attention", "heads": 0}], (5,), 1, "heads"),
        ([{"type": "embedding", "vocab_size": 9, "dim": 6},
          {"type": "transformer_block", "heads": 2, "mlp_ratio": 0}], (5,), 1, "mlp_ratio"),
        ([{"type": "embedding", "vocab_size": 9, "dim": 6},
          {"type": "positional_embedding", "max_len": 0}], (5,), 1, "max_len"),
        ([{"type": "embedding", "vocab_size": 9, "dim": 6},
          {"type": "self_attention", "heads": 2, "window": 3}], (5,), 1, "window"),
        ([{"type": "mean_pool"}], (5,), 0, "type"),
    ],
    ids=[
        "attention-heads-divide-dim", "block-heads-divide-dim", "time-over-max_len",
        "embedding-not-first", "embedding-needs-ids", "vocab-too-small", "dim-zero",
        "heads-zero", "mlp_ratio-zero", "max_len-zero", "unknown-field", "mean_pool-needs-time",
    ],
)  # fmt: skip
def test_invalid_text_specs_name_layer_and_field(
    layers: list[dict[str, Any]], input_shape: tuple[int, ...], layer: int, field: str
) -> None:
    spec = {"layers": [*layers, {"type": "dense", "units": 9}], "loss": "mse"}
    with pytest.raises(SpecError) as caught:
        summarize(spec, input_shape)
    assert caught.value.layer == layer
    assert caught.value.field == field


def test_summary_of_a_char_transformer() -> None:
    vocab, dim, context = 11, 8, 6
    summary = summarize(char_lm_spec(vocab, dim=dim, context=context), (context,))
    assert [layer.output_shape for layer in summary.layers] == [
        (context, dim), (context, dim), (context, dim), (context, dim), (context, dim),
        (context, vocab),
    ]  # fmt: skip
    block = 2 * 2 * dim + 4 * (dim * dim + dim) + (dim * 4 * dim + 4 * dim) + (4 * dim * dim + dim)
    assert summary.params == (
        vocab * dim + context * dim + 2 * block + 2 * dim + dim * vocab + vocab
    )
    assert all(layer.flops > 0 for layer in summary.layers[1:])


def test_model_keeps_token_ids_integer_and_checks_their_range(rng: np.random.Generator) -> None:
    model = build_model(char_lm_spec(7), (6,), dtype="float32")
    ids = rng.integers(0, 7, size=(2, 6))
    out = model.forward(ids)
    assert out.dtype == np.float32 and out.shape == (2, 6, 7)
    # Whole numbers given as floats (as JSON may deliver them) are the same ids.
    np.testing.assert_array_equal(model.forward(ids.astype(np.float64)), out)
    np.testing.assert_array_equal(model.forward(ids.astype(np.int32)), out)
    with pytest.raises(ValueError, match=r"token id 7 is out of range.*vocab_size 7"):
        model.forward(np.array([[0, 1, 7, 2, 3, 4]]))
    with pytest.raises(ValueError, match=r"token id -1 is out of range"):
        model.forward(np.array([[0, 1, -1, 2, 3, 4]]))
    with pytest.raises(ValueError, match="whole numbers"):
        model.forward(np.array([[0.5, 1, 2, 3, 4, 5]]))


def test_whole_text_model_gradients(rng: np.random.Generator) -> None:
    """embedding -> positions -> block -> mean_pool -> dense, through Model and the loss."""
    spec = {
        "layers": [
            {"type": "embedding", "vocab_size": 5, "dim": 4},
            {"type": "positional_embedding", "max_len": 3},
            {"type": "transformer_block", "heads": 2, "mlp_ratio": 1},
            {"type": "mean_pool"},
            {"type": "dense", "units": 3},
        ],
        "loss": "softmax_cross_entropy",
    }
    model = build_model(spec, (3,), seed=2, dtype="float64")
    for _, param, _ in model.parameters():
        param += 0.1 * rng.standard_normal(param.shape)
    ids = rng.integers(0, 5, size=(4, 3))
    labels = rng.integers(0, 3, size=4)

    def objective() -> float:
        return loss("softmax_cross_entropy", model.forward(ids, training=True), labels)[0]

    model.zero_grad()
    _, dlogits = loss("softmax_cross_entropy", model.forward(ids, training=True), labels)
    model.backward(dlogits)
    for name, param, grad in model.parameters():
        analytic = np.array(grad)
        numeric = numeric_grad(objective, param)
        np.testing.assert_allclose(analytic, numeric, rtol=1e-5, atol=1e-8, err_msg=name)


# --- against PyTorch --------------------------------------------------------------------------


def _torch() -> Any:
    return pytest.importorskip("torch", reason="PyTorch is the optional reference")


def _t(array: np.ndarray, grad: bool = False) -> Any:
    torch = _torch()
    return torch.tensor(np.asarray(array), dtype=torch.float64, requires_grad=grad)


def _close(actual: Any, expected: Any, name: str) -> None:
    if hasattr(expected, "detach"):
        expected = expected.detach().numpy()
    np.testing.assert_allclose(actual, expected, rtol=TORCH_RTOL, atol=TORCH_ATOL, err_msg=name)


def _torch_attention(x: Any, p: dict[str, Any], heads: int, causal: bool) -> Any:
    """Projections, heads split, ``scaled_dot_product_attention``, then the out projection."""
    F = _torch().nn.functional
    batch, time, dim = x.shape

    def split(a: Any) -> Any:
        return a.reshape(batch, time, heads, dim // heads).transpose(1, 2)

    q, k, v = (split(x @ p[f"W{n}"] + p[f"b{n}"]) for n in "qkv")
    mixed = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return mixed.transpose(1, 2).reshape(batch, time, dim) @ p["Wo"] + p["bo"]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("heads", [1, 2, 4])
def test_self_attention_matches_torch_sdpa(
    heads: int, causal: bool, rng: np.random.Generator
) -> None:
    _torch()
    layer = make_layer(
        {"type": "self_attention", "heads": heads, "causal": causal}, (7, 8), rng=rng
    )
    x = rng.standard_normal((3, 7, 8))
    dy = rng.standard_normal(x.shape)
    y, dx, grads = _forward_backward(layer, x, dy)

    xt = _t(x, True)
    pt = {key: _t(value, True) for key, value in layer.params.items()}
    yt = _torch_attention(xt, pt, heads, causal)
    yt.backward(_t(dy))
    _close(y, yt, "y")
    _close(dx, xt.grad, "dx")
    for key, value in pt.items():
        _close(grads[key], value.grad, f"d{key}")


def test_embedding_matches_torch(rng: np.random.Generator) -> None:
    torch = _torch()
    layer = make_layer({"type": "embedding", "vocab_size": 9, "dim": 5}, (6,), rng=rng, first=True)
    ids = rng.integers(0, 9, size=(4, 6))
    dy = rng.standard_normal((4, 6, 5))
    y, _, grads = _forward_backward(layer, ids, dy)

    reference = torch.nn.Embedding(9, 5).double()
    with torch.no_grad():
        reference.weight.copy_(_t(layer.params["W"]))
    yt = reference(torch.from_numpy(ids))
    yt.backward(_t(dy))
    _close(y, yt, "y")
    _close(grads["W"], reference.weight.grad, "dW")


def test_embedding_initialisation_follows_torch() -> None:
    """N(0, 1) as ``nn.Embedding``: mean near 0 and standard deviation near 1."""
    layer = make_layer({"type": "embedding", "vocab_size": 400, "dim": 50}, (3,))
    weights = layer.params["W"]
    assert abs(weights.mean()) < 0.02 and abs(weights.std() - 1.0) < 0.02


def _torch_block(x: Any, p: dict[str, Any], heads: int, causal: bool) -> Any:
    F = _torch().nn.functional
    dim = x.shape[-1]
    attn = {key[len("attn.") :]: value for key, value in p.items() if key.startswith("attn.")}
    ln1 = F.layer_norm(x, (dim,), p["ln1.gamma"], p["ln1.beta"], eps=1e-5)
    h = x + _torch_attention(ln1, attn, heads, causal)
    ln2 = F.layer_norm(h, (dim,), p["ln2.gamma"], p["ln2.beta"], eps=1e-5)
    return h + F.gelu(ln2 @ p["mlp1.W"] + p["mlp1.b"]) @ p["mlp2.W"] + p["mlp2.b"]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_transformer_block_matches_torch(causal: bool, rng: np.random.Generator) -> None:
    _torch()
    layer = make_layer({"type": "transformer_block", "heads": 2, "causal": causal}, (5, 6), rng=rng)
    x = rng.standard_normal((3, 5, 6))
    dy = rng.standard_normal(x.shape)
    y, dx, grads = _forward_backward(layer, x, dy)

    xt = _t(x, True)
    pt = {key: _t(value, True) for key, value in layer.params.items()}
    yt = _torch_block(xt, pt, heads=2, causal=causal)
    yt.backward(_t(dy))
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=TORCH_RTOL, atol=TORCH_ATOL)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=TORCH_RTOL, atol=TORCH_ATOL)
    for key, value in pt.items():
        np.testing.assert_allclose(
            grads[key], value.grad.numpy(), rtol=TORCH_RTOL, atol=TORCH_ATOL, err_msg=key
        )


def test_char_transformer_loss_and_gradients_match_torch(rng: np.random.Generator) -> None:
    """The whole model of the language-model test and the benchmark, against PyTorch."""
    torch = _torch()
    vocab, dim, context = 9, 8, 6
    model = build_model(char_lm_spec(vocab, dim=dim, context=context), (context,), dtype="float64")
    for _, param, _ in model.parameters():
        param += 0.1 * rng.standard_normal(param.shape)
    ids = rng.integers(0, vocab, size=(3, context))
    targets = rng.integers(0, vocab, size=(3, context))
    model.zero_grad()
    value, dlogits = loss("softmax_cross_entropy", model.forward(ids, training=True), targets)
    model.backward(dlogits)

    p = {name: _t(param, True) for name, param, _ in model.parameters()}
    h = p["0.W"][torch.from_numpy(ids)] + p["1.W"][:context]
    for index in (2, 3):
        prefix = f"{index}."
        block = {k[len(prefix) :]: v for k, v in p.items() if k.startswith(prefix)}
        h = _torch_block(h, block, heads=2, causal=True)
    h = torch.nn.functional.layer_norm(h, (dim,), p["4.gamma"], p["4.beta"], eps=1e-5)
    logits = h @ p["5.W"] + p["5.b"]
    reference = torch.nn.functional.cross_entropy(
        logits.reshape(-1, vocab), torch.from_numpy(targets).reshape(-1)
    )
    reference.backward()
    assert value == pytest.approx(reference.item(), rel=1e-6)
    for name, _, grad in model.parameters():
        np.testing.assert_allclose(
            grad, p[name].grad.numpy(), rtol=TORCH_RTOL, atol=TORCH_ATOL, err_msg=name
        )
