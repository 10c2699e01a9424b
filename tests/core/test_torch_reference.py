"""The engine against PyTorch, when PyTorch is installed.

Everything runs in float64 on both sides and must agree to 1e-5 (relative, with
a tiny absolute floor for values near zero). Layouts: engine layers take images
channels-last (N, H, W, C) while PyTorch takes NCHW, so layer-level comparisons
transpose, and the whole-model comparison feeds both NCHW. Conv weights are
(out, in, kh, kw) in both; the engine's dense W is (in, out), PyTorch's weight.T.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from core import build_model, build_optimizer, loss
from tests.factories import make_layer, nchw_to_nhwc, nhwc_to_nchw, tiny_cnn_spec

torch = pytest.importorskip("torch", reason="PyTorch is the optional reference implementation")
F = torch.nn.functional

RTOL = 1e-5
ATOL = 1e-10


def close(actual: Any, expected: Any, name: str = "") -> None:
    if isinstance(expected, torch.Tensor):
        expected = expected.detach().numpy()
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=ATOL, err_msg=name)


def t(array: np.ndarray, grad: bool = False) -> Any:
    return torch.tensor(array, dtype=torch.float64, requires_grad=grad)


def _run_layer(layer: Any, x: np.ndarray, dy: np.ndarray, training: bool = True):
    layer.zero_grad()
    y = layer.forward(x, training)
    dx = layer.backward(dy)
    return y, dx, {k: np.array(g) for k, g in layer.grads.items()}


@pytest.mark.parametrize("input_shape", [(5,), (3, 5)], ids=["2d", "3d"])
def test_dense(input_shape: tuple[int, ...], rng: np.random.Generator) -> None:
    layer = make_layer({"type": "dense", "units": 4}, input_shape, rng=rng)
    x = rng.standard_normal((3, *input_shape))
    dy = rng.standard_normal((3, *input_shape[:-1], 4))
    y, dx, grads = _run_layer(layer, x, dy)

    xt, w, b = t(x, True), t(layer.params["W"].T, True), t(layer.params["b"], True)
    yt = F.linear(xt, w, b)
    yt.backward(t(dy))
    close(y, yt, "y")
    close(dx, xt.grad, "dx")
    close(grads["W"], w.grad.T, "dW")
    close(grads["b"], b.grad, "db")


@pytest.mark.parametrize(
    ("kernel", "stride", "padding"),
    [(3, 1, 0), (3, 1, 1), (3, 2, 1), (2, 2, 0), (5, 2, 2)],
    ids=["k3-s1-p0", "k3-s1-p1", "k3-s2-p1", "k2-s2-p0", "k5-s2-p2"],
)
def test_conv2d(kernel: int, stride: int, padding: int, rng: np.random.Generator) -> None:
    spec = {
        "type": "conv2d",
        "filters": 4,
        "kernel_size": kernel,
        "stride": stride,
        "padding": padding,
    }
    layer = make_layer(spec, (3, 7, 9), rng=rng)
    x = rng.standard_normal((2, 3, 7, 9))
    xt, w, b = t(x, True), t(layer.params["W"], True), t(layer.params["b"], True)
    yt = F.conv2d(xt, w, b, stride=stride, padding=padding)
    dy = rng.standard_normal(tuple(yt.shape))
    yt.backward(t(dy))

    y, dx, grads = _run_layer(layer, nchw_to_nhwc(x), nchw_to_nhwc(dy))
    close(nhwc_to_nchw(y), yt, "y")
    close(nhwc_to_nchw(dx), xt.grad, "dx")
    close(grads["W"], w.grad, "dW")
    close(grads["b"], b.grad, "db")


_POOLS = [(2, 2), (3, 2), (2, 1), (3, 3)]
_POOL_IDS = ["k2", "k3-s2", "k2-s1", "k3"]


@pytest.mark.parametrize("kind", ["maxpool2d", "avgpool2d"])
@pytest.mark.parametrize(("pool", "stride"), _POOLS, ids=_POOL_IDS)
def test_pool2d(kind: str, pool: int, stride: int, rng: np.random.Generator) -> None:
    layer = make_layer({"type": kind, "pool_size": pool, "stride": stride}, (2, 7, 8))
    x = rng.standard_normal((2, 2, 7, 8))
    xt = t(x, True)
    yt = (F.max_pool2d if kind == "maxpool2d" else F.avg_pool2d)(xt, pool, stride)
    dy = rng.standard_normal(tuple(yt.shape))
    yt.backward(t(dy))
    y, dx, _ = _run_layer(layer, nchw_to_nhwc(x), nchw_to_nhwc(dy))
    close(nhwc_to_nchw(y), yt, "y")
    close(nhwc_to_nchw(dx), xt.grad, "dx")


@pytest.mark.parametrize("image", [True, False], ids=["image", "features"])
def test_batchnorm_train_and_running_stats(image: bool, rng: np.random.Generator) -> None:
    shape = (3, 4, 5) if image else (3,)
    layer = make_layer({"type": "batchnorm"}, shape, rng=rng)
    module = (torch.nn.BatchNorm2d if image else torch.nn.BatchNorm1d)(3).double()
    with torch.no_grad():
        module.weight.copy_(t(layer.params["gamma"]))
        module.bias.copy_(t(layer.params["beta"]))
    x = rng.standard_normal((4, *shape)) * 2 + 1
    dy = rng.standard_normal(x.shape)
    xt = t(x, True)
    module.train()
    yt = module(xt)
    yt.backward(t(dy))

    to_engine = nchw_to_nhwc if image else np.asarray
    y, dx, grads = _run_layer(layer, to_engine(x), to_engine(dy))
    from_engine = nhwc_to_nchw if image else np.asarray
    close(from_engine(y), yt, "y")
    close(from_engine(dx), xt.grad, "dx")
    close(grads["gamma"], module.weight.grad, "dgamma")
    close(grads["beta"], module.bias.grad, "dbeta")
    close(layer.buffers["running_mean"], module.running_mean, "running_mean")
    close(layer.buffers["running_var"], module.running_var, "running_var")

    # Evaluation uses the running statistics on both sides.
    module.eval()
    x2 = rng.standard_normal(x.shape)
    xt2 = t(x2, True)
    yt2 = module(xt2)
    yt2.backward(t(dy))
    y2, dx2, _ = _run_layer(layer, to_engine(x2), to_engine(dy), training=False)
    close(from_engine(y2), yt2, "y eval")
    close(from_engine(dx2), xt2.grad, "dx eval")


@pytest.mark.parametrize("input_shape", [(6,), (3, 6)], ids=["features", "sequence"])
def test_layernorm(input_shape: tuple[int, ...], rng: np.random.Generator) -> None:
    layer = make_layer({"type": "layernorm"}, input_shape, rng=rng)
    x = rng.standard_normal((4, *input_shape)) * 3
    dy = rng.standard_normal(x.shape)
    xt, g, b = t(x, True), t(layer.params["gamma"], True), t(layer.params["beta"], True)
    yt = F.layer_norm(xt, (6,), g, b, eps=1e-5)
    yt.backward(t(dy))
    y, dx, grads = _run_layer(layer, x, dy)
    close(y, yt, "y")
    close(dx, xt.grad, "dx")
    close(grads["gamma"], g.grad, "dgamma")
    close(grads["beta"], b.grad, "dbeta")


def test_gelu(rng: np.random.Generator) -> None:
    layer = make_layer({"type": "gelu"}, (50,))
    x = rng.standard_normal((4, 50)) * 3
    dy = rng.standard_normal(x.shape)
    xt = t(x, True)
    yt = F.gelu(xt, approximate="none")
    yt.backward(t(dy))
    y, dx, _ = _run_layer(layer, x, dy)
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("shape", [(6, 5), (2, 3, 5)], ids=["2d", "per-token-3d"])
def test_softmax_cross_entropy(shape: tuple[int, ...], rng: np.random.Generator) -> None:
    z = rng.standard_normal(shape) * 2
    y = rng.integers(0, shape[-1], shape[:-1])
    value, grad = loss("softmax_cross_entropy", z, y)
    zt = t(z, True)
    lt = F.cross_entropy(zt.reshape(-1, shape[-1]), torch.tensor(y.reshape(-1)))
    lt.backward()
    assert value == pytest.approx(lt.item(), rel=RTOL)
    close(grad, zt.grad, "dz")


def test_mse(rng: np.random.Generator) -> None:
    p, target = rng.standard_normal((5, 3)), rng.standard_normal((5, 3))
    value, grad = loss("mse", p, target)
    pt = t(p, True)
    lt = F.mse_loss(pt, t(target))
    lt.backward()
    assert value == pytest.approx(lt.item(), rel=RTOL)
    close(grad, pt.grad, "dp")


def test_binary_cross_entropy(rng: np.random.Generator) -> None:
    z = rng.standard_normal((6, 2)) * 4
    target = (rng.random((6, 2)) > 0.5).astype(np.float64)
    value, grad = loss("binary_cross_entropy", z, target)
    zt = t(z, True)
    lt = F.binary_cross_entropy_with_logits(zt, t(target))
    lt.backward()
    assert value == pytest.approx(lt.item(), rel=RTOL)
    close(grad, zt.grad, "dz")


def test_whole_cnn_with_nchw_inputs(rng: np.random.Generator) -> None:
    """Model (NCHW at its edges) against nn.Sequential: logits, loss and every gradient."""
    model = build_model(tiny_cnn_spec(filters=3, classes=4), (2, 6, 8), seed=1, dtype="float64")
    conv, dense = model.layers[0], model.layers[4]
    conv.params["b"][...] = rng.standard_normal(3) * 0.1
    reference = torch.nn.Sequential(
        torch.nn.Conv2d(2, 3, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(3 * 3 * 4, 4),
    ).double()
    with torch.no_grad():
        reference[0].weight.copy_(t(conv.params["W"]))
        reference[0].bias.copy_(t(conv.params["b"]))
        reference[4].weight.copy_(t(dense.params["W"].T))
        reference[4].bias.copy_(t(dense.params["b"]))
    x = rng.standard_normal((5, 2, 6, 8))
    labels = rng.integers(0, 4, 5)

    model.zero_grad()
    logits = model.forward(x, training=True)
    value, dlogits = loss("softmax_cross_entropy", logits, labels)
    model.backward(dlogits)

    logits_t = reference(t(x))
    loss_t = F.cross_entropy(logits_t, torch.tensor(labels))
    loss_t.backward()
    close(logits, logits_t, "logits")
    assert value == pytest.approx(loss_t.item(), rel=RTOL)
    close(conv.grads["W"], reference[0].weight.grad, "conv dW")
    close(conv.grads["b"], reference[0].bias.grad, "conv db")
    close(dense.grads["W"], reference[4].weight.grad.T, "dense dW")
    close(dense.grads["b"], reference[4].bias.grad, "dense db")


@pytest.mark.parametrize(
    ("spec", "make_reference"),
    [
        (
            {"type": "sgd", "lr": 0.1, "momentum": 0.9},
            lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
        ),
        (
            {"type": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
            lambda params: torch.optim.SGD(
                params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01
            ),
        ),
        ({"type": "adam", "lr": 0.01}, lambda params: torch.optim.Adam(params, lr=0.01)),
        (
            {"type": "adam", "lr": 0.01, "weight_decay": 0.1},
            lambda params: torch.optim.Adam(params, lr=0.01, weight_decay=0.1),
        ),
        ({"type": "adamw", "lr": 0.01}, lambda params: torch.optim.AdamW(params, lr=0.01)),
        (
            {"type": "adamw", "lr": 0.01, "weight_decay": 0.2, "betas": [0.8, 0.99]},
            lambda params: torch.optim.AdamW(params, lr=0.01, weight_decay=0.2, betas=(0.8, 0.99)),
        ),
    ],
    ids=["sgd-momentum", "sgd-nesterov-wd", "adam", "adam-l2", "adamw", "adamw-betas"],
)
def test_optimizer_steps(spec: dict[str, Any], make_reference: Any, rng: np.random.Generator):
    values = [rng.standard_normal((3, 4)), rng.standard_normal(4)]
    triples = [(f"p{i}", v.copy(), np.zeros_like(v)) for i, v in enumerate(values)]
    opt = build_optimizer(spec, triples)
    tensors = [t(v, True) for v in values]
    reference = make_reference(tensors)
    for _ in range(3):
        for (_, _, g), tensor in zip(triples, tensors, strict=True):
            g[...] = rng.standard_normal(g.shape)
            tensor.grad = t(g.copy())
        opt.step()
        reference.step()
        for (name, p, _), tensor in zip(triples, tensors, strict=True):
            close(p, tensor, name)
