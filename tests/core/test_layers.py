"""Every layer's backward against central finite differences, and the layer contract."""

from __future__ import annotations

import itertools
import math
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from core import build_model, loss
from core.gradcheck import check_layer, numeric_grad
from core.layers import LAYERS
from tests.factories import engine_batch, make_layer, nhwc_to_nchw, tiny_cnn_spec

# Central differences with eps=1e-6 in float64 leave about 1e-10 of round-off on
# each derivative (more where the checked sum is large); a wrong backward is off by
# order one. The absolute part admits derivatives that are exactly zero in theory,
# such as an attention key bias, which shifts every score of a query alike.
GRAD_RTOL = 1e-5
GRAD_ATOL = 1e-8

Draw = Callable[[np.random.Generator], tuple[dict[str, Any], tuple[int, ...]]]


def _int(rng: np.random.Generator, low: int, high: int) -> int:
    return int(rng.integers(low, high + 1))


@dataclass(frozen=True)
class Case:
    """A layer spec and per-sample input shape drawn from a seeded generator."""

    draw: Draw
    training: bool = True
    min_batch: int = 2
    token_ids: bool = False


def _features(spec: dict[str, Any]) -> Draw:
    return lambda r: (spec, (_int(r, 3, 7),))


def _image(spec: dict[str, Any], low: int = 4, high: int = 6) -> Draw:
    # Width exceeds height so a transposed H/W mix-up cannot pass.
    def draw(r: np.random.Generator) -> tuple[dict[str, Any], tuple[int, ...]]:
        h = _int(r, low, high)
        return spec, (_int(r, 1, 3), h, h + _int(r, 1, 2))

    return draw


def _conv(kernel: int, stride: int, padding: int) -> Draw:
    def draw(r: np.random.Generator) -> tuple[dict[str, Any], tuple[int, ...]]:
        h = _int(r, kernel + 2, kernel + 4)
        spec = {
            "type": "conv2d",
            "filters": _int(r, 2, 3),
            "kernel_size": kernel,
            "stride": stride,
            "padding": padding,
        }
        return spec, (_int(r, 2, 3), h, h + _int(r, 1, 2))

    return draw


def _pool(kind: str, pool: int, stride: int | None) -> Draw:
    return _image({"type": kind, "pool_size": pool, "stride": stride}, low=pool + 2, high=pool + 4)


def _sequence(spec: dict[str, Any], dim: int | None = None) -> Draw:
    return lambda r: (spec, (_int(r, 2, 4), dim or _int(r, 3, 5)))


CASES: dict[str, Case] = {
    "dense-2d": Case(lambda r: ({"type": "dense", "units": _int(r, 2, 5)}, (_int(r, 2, 6),))),
    "dense-3d": Case(
        lambda r: ({"type": "dense", "units": _int(r, 2, 4)}, (_int(r, 2, 4), _int(r, 2, 5)))
    ),
    "conv2d-k3-s1-p0": Case(_conv(3, 1, 0)),
    "conv2d-k3-s1-p1": Case(_conv(3, 1, 1)),
    "conv2d-k3-s2-p1": Case(_conv(3, 2, 1)),
    "conv2d-k2-s2-p0": Case(_conv(2, 2, 0)),
    "conv2d-k3-s2-p2": Case(_conv(3, 2, 2)),
    "conv2d-k1-s1-p0": Case(_conv(1, 1, 0)),
    "maxpool2d-k2-s2": Case(_pool("maxpool2d", 2, None)),
    "maxpool2d-k3-s2-overlapping": Case(_pool("maxpool2d", 3, 2)),
    "maxpool2d-k2-s1-overlapping": Case(_pool("maxpool2d", 2, 1)),
    "avgpool2d-k2-s2": Case(_pool("avgpool2d", 2, None)),
    "avgpool2d-k3-s1-overlapping": Case(_pool("avgpool2d", 3, 1)),
    "avgpool2d-k3-s3": Case(_pool("avgpool2d", 3, None)),
    "global_avgpool": Case(_image({"type": "global_avgpool"})),
    "flatten-image": Case(_image({"type": "flatten"})),
    "flatten-sequence": Case(_sequence({"type": "flatten"})),
    "relu": Case(_features({"type": "relu"})),
    "relu-image": Case(_image({"type": "relu"})),
    "leaky_relu": Case(_features({"type": "leaky_relu"})),
    "leaky_relu-slope0.2": Case(_features({"type": "leaky_relu", "negative_slope": 0.2})),
    "tanh": Case(_features({"type": "tanh"})),
    "sigmoid": Case(_features({"type": "sigmoid"})),
    "gelu": Case(_features({"type": "gelu"})),
    "gelu-sequence": Case(_sequence({"type": "gelu"})),
    "dropout": Case(_features({"type": "dropout", "rate": 0.4})),
    "dropout-image": Case(_image({"type": "dropout", "rate": 0.3})),
    "batchnorm-features-train": Case(_features({"type": "batchnorm"}), min_batch=3),
    "batchnorm-image-train": Case(_image({"type": "batchnorm"})),
    "batchnorm-features-eval": Case(_features({"type": "batchnorm"}), training=False),
    "batchnorm-image-eval": Case(_image({"type": "batchnorm"}), training=False),
    "layernorm-features": Case(_features({"type": "layernorm"})),
    "layernorm-sequence": Case(_sequence({"type": "layernorm"})),
    # Text layers, checked when this build has them (DESIGN.md names their fields).
    "embedding": Case(
        lambda r: ({"type": "embedding", "vocab_size": 4, "dim": _int(r, 2, 4)}, (6,)),
        token_ids=True,
    ),
    "positional_embedding": Case(_sequence({"type": "positional_embedding", "max_len": 5})),
    "mean_pool": Case(_sequence({"type": "mean_pool"})),
    "self_attention": Case(_sequence({"type": "self_attention", "heads": 2}, dim=4)),
    "self_attention-causal": Case(
        _sequence({"type": "self_attention", "heads": 2, "causal": True}, dim=4)
    ),
    "transformer_block": Case(
        _sequence({"type": "transformer_block", "heads": 2, "mlp_ratio": 2}, dim=4)
    ),
}


def _case_type(case_id: str) -> str:
    return CASES[case_id].draw(np.random.default_rng(0))[0]["type"]


def _present(case_id: str) -> Any:
    kind = _case_type(case_id)
    return pytest.param(
        case_id,
        id=case_id,
        marks=pytest.mark.skipif(kind not in LAYERS, reason=f"no {kind} layer in this build"),
    )


def _build(case_id: str, rng: np.random.Generator) -> tuple[Any, np.ndarray, Callable[[], None]]:
    """The layer (float64, perturbed parameters), an input batch, and a hook run before forward."""
    case = CASES[case_id]
    spec, input_shape = case.draw(rng)
    layer = make_layer(spec, input_shape, rng=rng)
    batch = _int(rng, case.min_batch, 4)
    if case.token_ids:
        layer.needs_input_grad = False
        x = rng.integers(0, spec["vocab_size"], size=(batch, *input_shape))
    else:
        x = engine_batch(rng, input_shape, batch)
    for name, value in layer.buffers.items():
        # Running statistics away from (0, 1), so evaluation mode is not the identity.
        if name == "running_var":
            value[...] = rng.uniform(0.5, 2.0, value.shape)
        else:
            value[...] = rng.standard_normal(value.shape)

    def fixed_mask() -> None:
        layer.rng = np.random.default_rng(1234)

    return layer, x, fixed_mask


ALL_CASES = [_present(case_id) for case_id in CASES]


def test_every_layer_type_has_a_gradient_check() -> None:
    checked = {_case_type(case_id) for case_id in CASES}
    assert set(LAYERS) <= checked, f"no gradient check for {sorted(set(LAYERS) - checked)}"


def _analytic_and_numeric(
    layer: Any, x: np.ndarray, *, training: bool, before_forward: Callable[[], None]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Backward's gradients of ``sum(y * r)`` (fixed random r) next to central differences."""

    def run() -> np.ndarray:
        before_forward()
        return layer.forward(x, training)

    weights = np.random.default_rng(7).standard_normal(run().shape)

    def scalar() -> float:
        return float((run() * weights).sum())

    layer.zero_grad()
    run()
    dx = layer.backward(weights.copy())
    pairs = {} if dx is None else {"x": (np.array(dx), numeric_grad(scalar, x))}
    analytic = {name: np.array(grad) for name, grad in layer.grads.items()}
    for name, param in layer.params.items():
        pairs[name] = (analytic[name], numeric_grad(scalar, param))
    return pairs


@pytest.mark.parametrize("case_id", ALL_CASES)
def test_gradients_match_central_differences(case_id: str, rng: np.random.Generator) -> None:
    layer, x, fixed_mask = _build(case_id, rng)
    pairs = _analytic_and_numeric(
        layer, x, training=CASES[case_id].training, before_forward=fixed_mask
    )
    expected = set(layer.params) | (set() if CASES[case_id].token_ids else {"x"})
    assert set(pairs) == expected
    for name, (analytic, numeric) in pairs.items():
        assert analytic.shape == numeric.shape, name
        np.testing.assert_allclose(
            analytic, numeric, rtol=GRAD_RTOL, atol=GRAD_ATOL, err_msg=f"{case_id}: d{name}"
        )


def test_check_layer_passes_a_right_backward_and_catches_a_wrong_one(
    rng: np.random.Generator,
) -> None:
    layer = make_layer({"type": "dense", "units": 3}, (4,), rng=rng)
    x = rng.standard_normal((5, 4))
    assert max(check_layer(layer, x).values()) < GRAD_RTOL

    class HalfBiasGradient(type(layer)):  # type: ignore[misc]
        def backward(self, dy: Any) -> Any:
            dx = super().backward(dy)
            self.grads["b"] *= 0.5
            return dx

    wrong = make_layer({"type": "dense", "units": 3}, (4,), rng=rng)
    wrong.__class__ = HalfBiasGradient
    errors = check_layer(wrong, x)
    assert errors["W"] < GRAD_RTOL and errors["x"] < GRAD_RTOL
    assert errors["b"] > 0.1


@pytest.mark.parametrize("case_id", ALL_CASES)
def test_backward_accumulates_until_zero_grad(case_id: str, rng: np.random.Generator) -> None:
    layer, x, fixed_mask = _build(case_id, rng)
    fixed_mask()
    y = layer.forward(x, CASES[case_id].training)
    dy = rng.standard_normal(y.shape)

    layer.zero_grad()
    dx_first = layer.backward(dy.copy())
    once = {k: np.array(g) for k, g in layer.grads.items()}
    dx_second = layer.backward(dy.copy())
    twice = {k: np.array(g) for k, g in layer.grads.items()}
    layer.zero_grad()
    layer.backward(dy.copy())
    again = {k: np.array(g) for k, g in layer.grads.items()}

    assert set(once) == set(layer.params)
    for key in once:
        assert np.any(once[key] != 0), key
        np.testing.assert_allclose(twice[key], 2 * once[key], rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(again[key], once[key], rtol=1e-12, atol=1e-14)
    if dx_first is not None:
        np.testing.assert_allclose(dx_second, dx_first, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    ("spec", "input_shape"),
    [
        ({"type": "dense", "units": 3}, (5,)),
        ({"type": "dense", "units": 3}, (2, 5)),
        ({"type": "conv2d", "filters": 2, "kernel_size": 3, "padding": 1}, (2, 5, 6)),
    ],
    ids=["dense", "dense-3d", "conv2d"],
)
def test_first_layer_returns_no_input_gradient(
    spec: dict[str, Any], input_shape: tuple[int, ...], rng: np.random.Generator
) -> None:
    layer = make_layer(spec, input_shape, rng=rng, first=True)
    x = engine_batch(rng, input_shape, 3)
    y = layer.forward(x, True)
    layer.zero_grad()
    assert layer.backward(np.ones_like(y)) is None
    # The parameter gradients are still there.
    assert all(np.any(g != 0) for g in layer.grads.values())


def test_build_model_asks_no_input_gradient_of_the_first_layer_only() -> None:
    model = build_model(tiny_cnn_spec(), (1, 8, 8))
    assert [layer.needs_input_grad for layer in model.layers] == [False] + [True] * 4


def test_whole_model_gradients_with_nchw_inputs(rng: np.random.Generator) -> None:
    """conv-relu-maxpool-flatten-dense through Model, so the NCHW <-> NHWC edges count too."""
    model = build_model(tiny_cnn_spec(filters=3, classes=4), (2, 6, 5), seed=3, dtype="float64")
    for _, param, _ in model.parameters():
        param += 0.1 * rng.standard_normal(param.shape)
    x = rng.standard_normal((3, 2, 6, 5))
    labels = rng.integers(0, 4, size=3)

    def objective() -> float:
        return loss("softmax_cross_entropy", model.forward(x, training=True), labels)[0]

    model.zero_grad()
    _, dlogits = loss("softmax_cross_entropy", model.forward(x, training=True), labels)
    model.backward(dlogits)
    analytic = {name: np.array(grad) for name, _, grad in model.parameters()}
    assert sorted(analytic) == ["0.W", "0.b", "4.W", "4.b"]
    for name, param, _ in model.parameters():
        numeric = numeric_grad(objective, param)
        np.testing.assert_allclose(analytic[name], numeric, rtol=1e-5, atol=1e-9, err_msg=name)


@pytest.mark.parametrize(("pool", "stride"), [(2, 2), (3, 2), (2, 1)])
def test_relu_before_maxpool_gives_the_numbers_of_the_listed_order(
    pool: int, stride: int, rng: np.random.Generator
) -> None:
    """The model runs a ReLU after the max pooling that follows it; forward values and
    every gradient equal those of running the layers as listed."""
    spec = {
        "layers": [
            {"type": "conv2d", "filters": 3, "kernel_size": 3, "padding": 1},
            {"type": "relu"},
            {"type": "maxpool2d", "pool_size": pool, "stride": stride},
            {"type": "flatten"},
            {"type": "dense", "units": 4},
        ],
        "loss": "softmax_cross_entropy",
    }
    model = build_model(spec, (2, 7, 7), seed=5)
    assert [layer.type for layer in model._run_order][1:3] == ["maxpool2d", "relu"]
    # Whole numbers: many ties within windows, and windows with no positive value.
    x = rng.integers(-3, 3, size=(6, 2, 7, 7)).astype(np.float32)
    labels = rng.integers(0, 4, size=6)

    model.zero_grad()
    outputs = model.forward(x, training=True)
    _, dlogits = loss("softmax_cross_entropy", outputs, labels)
    model.backward(dlogits)
    got = [np.array(grad) for _, _, grad in model.parameters()]

    model.zero_grad()
    h = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    for layer in model.layers:
        h = layer.forward(h, True)
    np.testing.assert_array_equal(h, outputs)
    d = dlogits
    for layer in reversed(model.layers):
        d = layer.backward(d)
    for (name, _, grad), mine in zip(model.parameters(), got, strict=True):
        np.testing.assert_array_equal(grad, mine, err_msg=name)


# --- forward values, layouts and conventions ----------------------------------------------


def _direct_conv_nchw(x: np.ndarray, w: np.ndarray, b: np.ndarray, stride: int, pad: int):
    """Cross-correlation by its definition, NCHW in and out."""
    n, _, h, wd = x.shape
    f, _, k, _ = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    oh, ow = (h + 2 * pad - k) // stride + 1, (wd + 2 * pad - k) // stride + 1
    y = np.empty((n, f, oh, ow))
    for i in range(oh):
        for j in range(ow):
            window = xp[:, :, i * stride : i * stride + k, j * stride : j * stride + k]
            y[:, :, i, j] = np.einsum("nchw,fchw->nf", window, w) + b
    return y


@pytest.mark.parametrize(("stride", "padding"), [(1, 0), (2, 1), (1, 2)])
def test_conv2d_model_computes_the_cross_correlation_of_nchw_input(
    stride: int, padding: int, rng: np.random.Generator
) -> None:
    spec = {
        "layers": [
            {"type": "conv2d", "filters": 4, "kernel_size": 3, "stride": stride, "padding": padding}
        ],
        "loss": "mse",
    }
    model = build_model(spec, (3, 7, 6), dtype="float64")
    model.layers[0].params["b"][...] = rng.standard_normal(4)
    x = rng.standard_normal((2, 3, 7, 6))
    w, b = model.layers[0].params["W"], model.layers[0].params["b"]
    assert w.shape == (4, 3, 3, 3)
    expected = _direct_conv_nchw(x, w, b, stride, padding)
    y = model.forward(x)
    assert y.shape == expected.shape == (2, *model.output_shape)
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("kernel", "stride", "padding", "channels"),
    # 16 channels: wide strips take dx's direct adds (runs of 128 numbers and more)
    [(3, 1, 1, 2), (3, 2, 1, 2), (5, 1, 2, 2), (2, 2, 0, 2), (3, 1, 1, 16)],
)
def test_conv2d_every_strip_width_gives_the_same_values_and_gradients(
    kernel: int,
    stride: int,
    padding: int,
    channels: int,
    rng: np.random.Generator,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The cost model picks the strip widths by shape; every choice must compute the same,
    and so must the forward pass and dx's direct adds, whole or a few images at a time
    (two, or one), and (stride 1) dx as the convolution of dy with the flipped kernel, in
    strips of every width."""
    from core.layers import conv

    spec = {"type": "conv2d", "filters": 3, "kernel_size": kernel}
    spec |= {"stride": stride, "padding": padding}
    layer = make_layer(spec, (channels, 7, 12), rng=rng)
    x = engine_batch(rng, (channels, 7, 12), 3)
    expected_y = _direct_conv_nchw(
        nhwc_to_nchw(x), layer.params["W"], layer.params["b"], stride, padding
    )
    dy = rng.standard_normal((3, *expected_y.shape[2:], 3))
    ow = expected_y.shape[-1]
    results = []

    def run() -> None:
        layer.zero_grad()
        y = layer.forward(x, True)
        np.testing.assert_allclose(nhwc_to_nchw(y), expected_y, rtol=1e-12, atol=1e-12)
        dx = layer.backward(dy)
        results.append((dx.copy(), layer.grads["W"].copy(), layer.grads["b"].copy()))

    widths = [d for d in range(1, ow + 1) if ow % d == 0]
    layer.dx_as_conv = False
    for t, t_dx, pieces in itertools.product(widths, widths, ["whole", "two", "one"]):
        layer.strip, layer.strip_dx = t, t_dx
        tiles, _, rows = layer._tiling(t_dx)
        two_images = 2 * expected_y.shape[2] * tiles * rows * x.itemsize  # of dx's
        size = {"whole": 1 << 30, "two": two_images, "one": 1}[pieces]
        monkeypatch.setattr(conv, "_PIECE_BYTES", size)
        run()
    assert len(results) > 8
    if stride == 1:
        layer.dx_as_conv = True
        for t in (1, 2, 3, 4, 6, 12):  # the divisors of the input's width
            layer.flipped_conv().strip = t
            run()
    for result in results[1:]:
        for got, want in zip(result, results[0], strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_first_conv2d_gathers_into_two_buffers_in_turn_with_the_same_numbers(
    rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first convolution's strips alternate between two buffers from one training
    step to the next (the second convolution keeps one); training computes the same bits
    as with one buffer, and an evaluation pass between steps changes nothing."""
    from core import Trainer
    from core.layers import conv
    from core.spec import TrainingSpec

    spec = {
        "layers": [
            {"type": "conv2d", "filters": 4, "kernel_size": 3, "padding": 1},
            {"type": "relu"},
            {"type": "conv2d", "filters": 3, "kernel_size": 3},
            {"type": "flatten"},
            {"type": "dense", "units": 3},
        ],
        "loss": "softmax_cross_entropy",
    }
    x = rng.standard_normal((6, 2, 8, 8)).astype(np.float32)
    y = rng.integers(0, 3, size=6)

    def train(turns_max_bytes: int) -> tuple[list[np.ndarray], list[list[int]]]:
        monkeypatch.setattr(conv, "_TURNS_MAX_BYTES", turns_max_bytes)
        trainer = Trainer(
            model_spec=spec,
            optimizer_spec={"type": "adam", "lr": 0.01},
            training=TrainingSpec(batch_size=6, seed=1),
            input_shape=(2, 8, 8),
            num_classes=3,
        )
        first, second = trainer.model.layers[0], trainer.model.layers[2]
        buffers: list[list[int]] = [[], []]
        for _ in range(4):
            trainer.train_step(x, y, steps_per_epoch=4, total_steps=4)
            trainer.predict(x)
            buffers[0].append(id(first._strips))
            buffers[1].append(id(second._strips))
        return [p.copy() for _, p, _ in trainer.model.parameters()], buffers

    params, (first, second) = train(conv._TURNS_MAX_BYTES)
    assert first[0] == first[2] != first[1] == first[3]
    assert len(set(second)) == 1
    one_buffer, (first, _) = train(0)
    assert len(set(first)) == 1
    for got, want in zip(params, one_buffer, strict=True):
        np.testing.assert_array_equal(got, want)


def test_flatten_keeps_channels_first_order(rng: np.random.Generator) -> None:
    model = build_model({"layers": [{"type": "flatten"}], "loss": "mse"}, (3, 4, 5))
    x = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
    np.testing.assert_array_equal(model.forward(x), x.reshape(2, -1))


def test_dense_3d_acts_on_the_last_axis(rng: np.random.Generator) -> None:
    layer = make_layer({"type": "dense", "units": 3}, (4, 5), rng=rng)
    x = rng.standard_normal((2, 4, 5))
    y = layer.forward(x, True)
    for t in range(4):
        np.testing.assert_allclose(
            y[:, t], x[:, t] @ layer.params["W"] + layer.params["b"], rtol=1e-12
        )


def test_maxpool_sends_the_gradient_to_the_first_maximum_of_a_tie() -> None:
    layer = make_layer({"type": "maxpool2d", "pool_size": 2}, (1, 2, 2))
    x = np.full((1, 2, 2, 1), 3.0)
    y = layer.forward(x, True)
    assert y.shape == (1, 1, 1, 1) and y.item() == 3.0
    dx = layer.backward(np.full_like(y, 5.0))
    np.testing.assert_array_equal(dx[0, :, :, 0], [[5.0, 0.0], [0.0, 0.0]])


@pytest.mark.parametrize(
    ("pool", "stride", "shape"),
    [(3, 2, (2, 9, 8)), (2, 1, (3, 5, 6)), (3, 1, (2, 6, 7)), (2, 3, (2, 8, 9)), (1, 2, (2, 5, 5))],
    ids=["k3-s2", "k2-s1", "k3-s1", "k2-s3-gaps", "k1-s2"],
)
def test_maxpool_of_any_window_sends_each_gradient_to_its_first_maximum(
    pool: int, stride: int, shape: tuple[int, int, int], rng: np.random.Generator
) -> None:
    """Windows other than 2x2 stride 2 (overlapping, with gaps between them, of one
    pixel): against a loop over the windows, on numbers with many ties, twice."""
    layer = make_layer({"type": "maxpool2d", "pool_size": pool, "stride": stride}, shape)
    assert not layer._fast()
    c, h, w = shape
    oh, ow = (h - pool) // stride + 1, (w - pool) // stride + 1
    for _ in range(2):
        x = rng.integers(0, 3, (2, h, w, c)).astype(np.float64)
        dy = rng.standard_normal((2, oh, ow, c))
        expected_y, expected_dx = _maxpool_by_loop(x, dy, pool, stride)
        np.testing.assert_array_equal(layer.forward(x, True), expected_y)
        np.testing.assert_allclose(layer.backward(dy), expected_dx, rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize("pieces", ["whole", "two", "one"])
@pytest.mark.parametrize("shape", [(3, 6, 8), (2, 7, 9)], ids=["tiled", "cropped"])
def test_maxpool_2x2_in_pieces_of_the_batch_sends_each_gradient_to_its_first_maximum(
    shape: tuple[int, int, int],
    pieces: str,
    rng: np.random.Generator,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The 2x2 path on whole rows, on the batch at once or a few images at a time (two,
    or one): against a loop over the windows, on numbers with many ties, twice."""
    from core.layers import conv

    c, h, w = shape
    oh, ow = h // 2, w // 2
    two_images = 2 * (2 * oh) * (2 * ow) * c * np.dtype(np.float64).itemsize
    monkeypatch.setattr(
        conv, "_PIECE_BYTES", {"whole": 1 << 30, "two": two_images, "one": 1}[pieces]
    )
    layer = make_layer({"type": "maxpool2d", "pool_size": 2}, shape)
    assert layer._fast()
    for _ in range(2):
        x = rng.integers(0, 3, (5, h, w, c)).astype(np.float64)
        dy = rng.standard_normal((5, oh, ow, c))
        expected_y, expected_dx = _maxpool_by_loop(x, dy, 2, 2)
        np.testing.assert_array_equal(layer.forward(x, True), expected_y)
        np.testing.assert_array_equal(layer.backward(dy), expected_dx)


@pytest.mark.parametrize("pool", ["maxpool2d", "avgpool2d"])
def test_pooling_backward_takes_no_new_arrays_after_the_first_step(
    pool: str, rng: np.random.Generator
) -> None:
    """From the second step on, a 2x2 pool's backward allocates nothing near the size of
    its dy: the spread of dy over each window's pixels is taken into the workspace, as
    dx is (a new array every step would be fresh pages, zeroed on first touch)."""
    shape = (6, 28, 28)
    layer = make_layer({"type": pool, "pool_size": 2}, shape, dtype=np.float32)
    x = engine_batch(rng, shape, 64).astype(np.float32)
    dy = rng.standard_normal((64, 14, 14, 6)).astype(np.float32)
    layer.forward(x, True)
    first = layer.backward(dy).copy()  # the first step fills the workspace
    layer.forward(x, True)
    tracemalloc.start()
    try:
        again = layer.backward(dy)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < dy.nbytes // 2  # room for NumPy's iterator buffers, not for a copy of dy
    np.testing.assert_array_equal(again, first)


def _maxpool_by_loop(x: np.ndarray, dy: np.ndarray, pool: int, stride: int):
    """Max pooling's y and dx, window by window: each gradient to the window's first
    maximum in row-major order."""
    n, oh, ow, c = dy.shape
    y = np.empty_like(dy)
    dx = np.zeros_like(x)
    for b, u, v, ch in itertools.product(range(n), range(oh), range(ow), range(c)):
        window = x[b, u * stride : u * stride + pool, v * stride : v * stride + pool, ch]
        i, j = np.unravel_index(np.argmax(window), window.shape)  # the first, row-major
        y[b, u, v, ch] = window[i, j]
        dx[b, u * stride + i, v * stride + j, ch] += dy[b, u, v, ch]
    return y, dx


def test_overlapping_maxpool_adds_gradients_of_shared_maxima() -> None:
    layer = make_layer({"type": "maxpool2d", "pool_size": 2, "stride": 1}, (1, 3, 3))
    x = np.zeros((1, 3, 3, 1))
    x[0, 1, 1, 0] = 9.0  # the centre is the maximum of all four windows
    y = layer.forward(x, True)
    np.testing.assert_array_equal(y[0, :, :, 0], np.full((2, 2), 9.0))
    dx = layer.backward(np.arange(1.0, 5.0).reshape(1, 2, 2, 1))
    expected = np.zeros((3, 3))
    expected[1, 1] = 1 + 2 + 3 + 4
    np.testing.assert_array_equal(dx[0, :, :, 0], expected)


@pytest.mark.parametrize(
    ("pool", "shape"),
    [(2, (3, 6, 8)), (2, (3, 7, 9)), (3, (2, 9, 6)), (3, (2, 10, 11))],
    ids=["k2", "k2-cropped", "k3", "k3-cropped"],
)
def test_avgpool_on_whole_rows_gives_the_numbers_of_the_window_views(
    pool: int, shape: tuple[int, int, int], rng: np.random.Generator
) -> None:
    """Windows that do not overlap take the row path, and give what the path of
    overlapping windows (one strided view per window offset) and plain window means
    give. Each path runs twice, so that arrays kept from the first step are written
    again; cropped inputs leave their last rows or columns out, with a zero gradient."""
    layer = make_layer({"type": "avgpool2d", "pool_size": pool}, shape)
    assert layer._tiled()
    c, h, w = shape
    oh, ow = h // pool, w // pool
    for tiled in (True, False):
        layer._tiled = lambda tiled=tiled: tiled  # type: ignore[method-assign]
        for _ in range(2):
            x = engine_batch(rng, shape, 3)
            dy = rng.standard_normal((3, oh, ow, c))
            windows = x[:, : oh * pool, : ow * pool, :].reshape(3, oh, pool, ow, pool, c)
            y = layer.forward(x, True)
            np.testing.assert_allclose(y, windows.mean(axis=(2, 4)), rtol=1e-12, atol=1e-15)
            expected = np.zeros_like(x)
            spread = np.repeat(np.repeat(dy, pool, axis=1), pool, axis=2) / pool**2
            expected[:, : oh * pool, : ow * pool, :] = spread
            np.testing.assert_allclose(layer.backward(dy), expected, rtol=1e-12, atol=1e-15)


def test_gelu_is_the_exact_erf_form(rng: np.random.Generator) -> None:
    x = np.concatenate([rng.standard_normal(200) * 3, [0.0, -8.0, 8.0, -20.0, -37.0]])
    layer = make_layer({"type": "gelu"}, (x.size,))
    y = layer.forward(x[None], True)[0]
    # 0.5 x erfc(-x / sqrt 2): no cancellation, so the deep negative tail is exact too
    expected = np.array([0.5 * v * math.erfc(-v / math.sqrt(2)) for v in x])
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=0)
    assert y[200] == 0.0 and abs(y[202] - 8.0) < 1e-12


def test_gelu_in_float32_is_within_its_resolution(rng: np.random.Generator) -> None:
    x = np.concatenate([rng.standard_normal(500) * 3, [-8.0, -12.0]]).astype(np.float32)
    layer = make_layer({"type": "gelu"}, (x.size,), dtype=np.float32)
    y = layer.forward(x[None], True)[0]
    expected = np.array([0.5 * v * math.erfc(-v / math.sqrt(2)) for v in x.astype(np.float64)])
    np.testing.assert_allclose(y, expected, rtol=3e-5, atol=1e-7)


def test_activations_values(rng: np.random.Generator) -> None:
    x = rng.standard_normal((3, 8)) * 4

    def run(spec: dict[str, Any]) -> np.ndarray:
        return make_layer(spec, (8,)).forward(x, True)

    np.testing.assert_array_equal(run({"type": "relu"}), np.maximum(x, 0))
    np.testing.assert_allclose(run({"type": "leaky_relu"}), np.where(x > 0, x, 0.01 * x))
    np.testing.assert_allclose(run({"type": "tanh"}), np.tanh(x))
    np.testing.assert_allclose(run({"type": "sigmoid"}), 1 / (1 + np.exp(-x)), rtol=1e-12)
    big = make_layer({"type": "sigmoid"}, (2,)).forward(np.array([[-800.0, 800.0]]), True)
    np.testing.assert_array_equal(big, [[0.0, 1.0]])


def test_dropout_scales_survivors_and_is_the_identity_in_evaluation(
    rng: np.random.Generator,
) -> None:
    rate = 0.5
    layer = make_layer({"type": "dropout", "rate": rate}, (1000,))
    x = rng.uniform(1.0, 2.0, (4, 1000))
    y = layer.forward(x, True)
    kept = y != 0
    assert 0.4 < kept.mean() < 0.6
    np.testing.assert_allclose(y[kept], x[kept] / (1 - rate))
    dx = layer.backward(np.ones_like(y))
    np.testing.assert_array_equal(dx, np.where(kept, 1 / (1 - rate), 0.0))
    np.testing.assert_array_equal(layer.forward(x, False), x)
    layer.rng = np.random.default_rng(5)
    first = layer.forward(x, True)
    layer.rng = np.random.default_rng(5)
    np.testing.assert_array_equal(layer.forward(x, True), first)


@pytest.mark.parametrize("image", [False, True], ids=["features", "image"])
def test_batchnorm_normalises_per_channel_and_updates_running_stats(
    image: bool, rng: np.random.Generator
) -> None:
    shape = (3, 4, 5) if image else (3,)
    layer = make_layer({"type": "batchnorm"}, shape)
    x = engine_batch(rng, shape, 6) * 3 + 2
    y = layer.forward(x, True)
    per_channel = y.reshape(-1, 3)
    np.testing.assert_allclose(per_channel.mean(axis=0), 0, atol=1e-12)
    np.testing.assert_allclose(per_channel.var(axis=0), 1, rtol=1e-4)
    flat = x.reshape(-1, 3)
    np.testing.assert_allclose(layer.buffers["running_mean"], 0.1 * flat.mean(axis=0))
    np.testing.assert_allclose(
        layer.buffers["running_var"], 0.9 + 0.1 * flat.var(axis=0, ddof=1), rtol=1e-12
    )
    evaluated = layer.forward(x, False).reshape(-1, 3)
    expected = (flat - layer.buffers["running_mean"]) / np.sqrt(layer.buffers["running_var"] + 1e-5)
    np.testing.assert_allclose(evaluated, expected, rtol=1e-12)


@pytest.mark.parametrize("training", [True, False])
def test_batchnorm_in_pieces_computes_what_it_does_at_once(
    training: bool, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    from core.layers import norm

    shape = (3, 7, 7)  # 20 x 49 rows of 3 channels: 7 wide rows of 140 x 3 numbers
    x = engine_batch(rng, shape, 20) * 3 + 2
    dy = engine_batch(rng, shape, 20)
    results = []
    for chunk in (norm.BATCHNORM_CHUNK, 2 * 420):  # at once; in pieces of 2, 2, 2 and 1 rows
        monkeypatch.setattr(norm, "BATCHNORM_CHUNK", chunk)
        layer = make_layer({"type": "batchnorm"}, shape, rng=np.random.default_rng(1))
        if not training:
            layer.forward(x * 0.5 - 1, True)  # running statistics to evaluate with
        y = layer.forward(x, training)
        dx = layer.backward(dy)
        results.append((y, dx, *layer.grads.values(), *layer.buffers.values()))
        pieces, _ = layer._pieces(7, 420, x.dtype)  # 7 wide rows of 140 x 3 numbers
        sizes = [p.stop - p.start for p in pieces]
        assert sizes == ([7] if len(results) == 1 else [2, 2, 2, 1])
    for got, want in zip(results[1], results[0], strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_layernorm_normalises_each_row(rng: np.random.Generator) -> None:
    layer = make_layer({"type": "layernorm"}, (3, 6))
    y = layer.forward(rng.standard_normal((2, 3, 6)) * 5 - 1, True)
    np.testing.assert_allclose(y.mean(axis=-1), 0, atol=1e-12)
    np.testing.assert_allclose(y.var(axis=-1), 1, rtol=1e-4)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("contiguous", [True, False])
def test_take_where_negative_selects_by_the_sign_bit(
    dtype: Any, contiguous: bool, rng: np.random.Generator
) -> None:
    from core.special import take_where_negative

    edges = [0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, 1e-45, -1e-45]
    x = np.concatenate([rng.standard_normal(1000), edges]).astype(dtype)
    negative, into = (rng.standard_normal(x.size).astype(dtype) for _ in range(2))
    if not contiguous:  # the masked-copy fallback
        x, negative, into = (np.repeat(a, 2)[::2] for a in (x, negative, into))
    expected = np.where(np.signbit(x), negative, into)
    result = take_where_negative(x, negative.copy(), into, np.empty_like(x))
    assert result is into
    bits = [np.ascontiguousarray(a).view(np.uint8) for a in (result, expected)]
    assert np.array_equal(*bits)  # NaN's sign included


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sigmoid_of_any_shape_is_the_logistic_function(dtype: Any) -> None:
    from core.layers.activations import sigmoid

    values = np.array([-800.0, -3.0, -0.0, 0.0, 0.5, 40.0, np.inf, -np.inf], dtype=dtype)
    # whole, strided, 0-d and a NumPy scalar
    for x in (values, values.reshape(2, 4)[:, ::2], values[5:6].reshape(()), dtype(-3.0)):
        with np.errstate(over="ignore"):
            expected = 1 / (1 + np.exp(-np.asarray(x, np.float64)))
        got = sigmoid(np, x)
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=0)
        assert got.dtype == dtype and got.shape == np.shape(x)


def test_float32_gelu_and_normal_cdf_are_right_to_float32_resolution() -> None:
    """The fused float32 GELU, and the float32 ``normal_cdf`` (CuPy's way), against the
    float64 ones (Cephes): within a few ulps for |x| <= 3; below, where the rounding of x^2
    in exp(-x^2 / 2) limits any float32 form, within 6e-6 relative, down to x = -13."""
    from core.special import gelu_and_slope, normal_cdf

    x = np.linspace(-13, 13, 520_001, dtype=np.float32)
    exact = x.astype(np.float64)

    def ulps(got: np.ndarray, want: np.ndarray) -> np.ndarray:
        return np.abs(got - want) / np.spacing(np.abs(want).astype(np.float32))

    middle, lower = np.abs(x) <= 3, x < -3
    for got, want in (
        (gelu_and_slope(np, x)[0], gelu_and_slope(np, exact)[0]),
        (normal_cdf(np, x), normal_cdf(np, exact)),
    ):
        assert ulps(got[middle], want[middle]).max() <= 10
        assert (np.abs(got[lower] - want[lower]) / np.abs(want[lower])).max() <= 6e-6
    slope, exact_slope = gelu_and_slope(np, x)[1], gelu_and_slope(np, exact)[1]
    assert np.abs(slope - exact_slope).max() <= 3e-7


def test_gelu_float32_chunks_cover_every_element(rng: np.random.Generator) -> None:
    from core.special import GELU_CHUNK, gelu_and_slope

    edges = [0.0, -0.0, 1e-45, -1e-45, 1e-20, -1e-20, 9.0, -9.0, 30.0, -30.0]
    x = np.concatenate([rng.standard_normal(2 * GELU_CHUNK + 123) * 3, edges]).astype(np.float32)
    y, slope = gelu_and_slope(np, x)
    assert np.array_equal(np.signbit(y[-len(edges) :]), np.signbit(x[-len(edges) :]))
    exact = x.astype(np.float64)
    cdf = np.array([0.5 * math.erfc(-v / math.sqrt(2)) for v in exact])
    pdf = np.exp(-0.5 * exact * exact) / math.sqrt(2 * math.pi)
    np.testing.assert_allclose(y, exact * cdf, rtol=3e-5, atol=1e-7)
    np.testing.assert_allclose(slope, cdf + exact * pdf, rtol=3e-5, atol=1e-6)
