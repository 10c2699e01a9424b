"""A bad spec is a SpecError naming the layer and field; summaries count parameters and FLOPs."""

from __future__ import annotations

import pickle
from typing import Any

import pytest

from core import SpecError, build_model, build_optimizer, parse_job_spec, summarize
from core.errors import format_loc
from tests.factories import digits_job, example_job

DIGITS = (1, 8, 8)


def _model(*layers: dict[str, Any], loss: str = "softmax_cross_entropy") -> dict[str, Any]:
    return {"layers": list(layers), "loss": loss}


FLAT = ({"type": "flatten"},)
HEAD = ({"type": "dense", "units": 10},)


def _build_error(spec: dict[str, Any], input_shape: tuple[int, ...] = DIGITS, **kwargs: Any):
    with pytest.raises(SpecError) as info:
        build_model(spec, input_shape, **kwargs)
    # summarize() validates the same way without allocating anything
    with pytest.raises(SpecError) as again:
        summarize(spec, input_shape, **kwargs)
    assert str(again.value) == str(info.value)
    return info.value


def test_spec_error_is_a_value_error() -> None:
    assert issubclass(SpecError, ValueError)


@pytest.mark.parametrize(
    "error",
    [
        SpecError("bad targets", field="loss"),
        SpecError("too small", layer=3, layer_type="dense", field="units"),
        SpecError("at most 1", loc=("optimizer", "betas", 0), field="betas"),
    ],
    ids=["model-field", "layer", "loc"],
)
def test_spec_error_survives_pickling_as_it_was(error: SpecError) -> None:
    """Ray pickles a worker's error to bring it back: it must read the same there."""
    back = pickle.loads(pickle.dumps(error))
    assert (str(back), back.loc, back.layer, back.layer_type, back.field, back.reason) == (
        str(error),
        error.loc,
        error.layer,
        error.layer_type,
        error.field,
        error.reason,
    )


def test_unknown_layer_type() -> None:
    err = _build_error(_model(*FLAT, {"type": "dense", "units": 4}, {"type": "convolution"}))
    assert err.loc == ("model", "layers", 2, "type")
    assert (err.layer, err.field) == (2, "type")
    assert str(err).startswith("model.layers[2].type: unknown type 'convolution'")
    assert "'dense'" in str(err)  # the known types are listed


@pytest.mark.parametrize("units", [0, -3])
def test_units_must_be_positive(units: int) -> None:
    err = _build_error(_model(*FLAT, {"type": "relu"}, {"type": "dense", "units": units}))
    assert err.loc == ("model", "layers", 2, "units")
    assert (err.layer, err.layer_type, err.field) == (2, "dense", "units")
    assert str(err).startswith("model.layers[2].units (dense): ")
    assert "greater than or equal to 1" in str(err)


def test_missing_field() -> None:
    err = _build_error(_model({"type": "conv2d", "kernel_size": 3}, *FLAT, *HEAD))
    assert err.loc == ("model", "layers", 0, "filters")
    assert (err.layer, err.field) == (0, "filters")
    assert "field required" in str(err)


def test_conv_kernel_larger_than_its_input() -> None:
    spec = _model(
        {"type": "conv2d", "filters": 4, "kernel_size": 3},  # 8x8 -> 6x6
        {"type": "maxpool2d", "pool_size": 2},  # -> 3x3
        {"type": "conv2d", "filters": 4, "kernel_size": 5},
        *FLAT,
        *HEAD,
    )
    err = _build_error(spec)
    assert err.loc == ("model", "layers", 2, "kernel_size")
    assert (err.layer, err.layer_type, err.field) == (2, "conv2d", "kernel_size")
    assert str(err).startswith("model.layers[2].kernel_size (conv2d): kernel_size 5 is larger")
    assert "3x3" in str(err)


def test_padding_must_be_smaller_than_the_kernel() -> None:
    err = _build_error(_model({"type": "conv2d", "filters": 2, "kernel_size": 2, "padding": 2}))
    assert (err.layer, err.field) == (0, "padding")


def test_pool_larger_than_its_input() -> None:
    err = _build_error(_model({"type": "maxpool2d", "pool_size": 9}, *FLAT, *HEAD))
    assert err.loc == ("model", "layers", 0, "pool_size")
    assert "pool_size 9 is larger than the input 8x8" in str(err)


def test_dense_directly_on_an_image() -> None:
    err = _build_error(_model({"type": "relu"}, {"type": "dense", "units": 10}))
    assert (err.layer, err.layer_type, err.field) == (1, "dense", "units")
    assert err.loc == ("model", "layers", 1, "units")
    assert "flatten" in str(err) and "(1, 8, 8)" in str(err)


@pytest.mark.parametrize(
    "layer",
    [{"type": "conv2d", "filters": 2, "kernel_size": 3}, {"type": "global_avgpool"}],
    ids=["conv2d", "global_avgpool"],
)
def test_image_layers_refuse_flat_input(layer: dict[str, Any]) -> None:
    err = _build_error(_model(*FLAT, layer, *HEAD))
    assert err.layer == 1
    assert "image" in str(err)


def test_extra_unknown_field() -> None:
    err = _build_error(_model(*FLAT, {"type": "dense", "units": 10, "activation": "relu"}))
    assert err.loc == ("model", "layers", 1, "activation")
    assert (err.layer, err.field) == (1, "activation")
    assert str(err) == "model.layers[1].activation (dense): unknown field"


def test_softmax_cross_entropy_needs_two_outputs() -> None:
    err = _build_error(_model(*FLAT, {"type": "dense", "units": 1}))
    assert err.loc == ("model", "loss") and err.field == "loss" and err.layer is None
    assert "at least 2 classes" in str(err)


def test_class_count_must_match_the_dataset() -> None:
    err = _build_error(_model(*FLAT, {"type": "dense", "units": 5}), num_classes=10)
    assert err.loc == ("model", "loss") and err.field == "loss"
    assert "10 classes" in str(err) and "5 outputs" in str(err)
    # without a dataset to compare with, five classes are fine
    build_model(_model(*FLAT, {"type": "dense", "units": 5}), DIGITS)


def test_binary_cross_entropy_on_a_binary_label_needs_one_output() -> None:
    err = _build_error(
        _model(*FLAT, {"type": "dense", "units": 2}, loss="binary_cross_entropy"), num_classes=2
    )
    assert err.field == "loss" and "one output" in str(err)


def test_loss_must_fit_the_dataset_labels() -> None:
    """digits' integer labels: mse regresses one number per sample, and
    binary_cross_entropy takes 0/1 labels, not 10 classes."""
    mse = _build_error(_model(*FLAT, *HEAD, loss="mse"), num_classes=10, label_shape=())
    assert mse.loc == ("model", "loss") and mse.field == "loss" and mse.layer is None
    assert "1 output per sample" in str(mse) and "softmax_cross_entropy" in str(mse)
    bce = _build_error(
        _model(*FLAT, *HEAD, loss="binary_cross_entropy"), num_classes=10, label_shape=()
    )
    assert bce.loc == ("model", "loss")
    assert "10 classes: use softmax_cross_entropy" in str(bce)
    # one number per sample fits the labels, as it did before
    one = _model(*FLAT, {"type": "dense", "units": 1}, loss="mse")
    build_model(one, DIGITS, num_classes=10, label_shape=())


TEXT = (12,)


def _text_model(vocab_size: int) -> dict[str, Any]:
    return _model(
        {"type": "embedding", "vocab_size": vocab_size, "dim": 4},
        {"type": "mean_pool"},
        {"type": "dense", "units": 2},
    )


def test_embedding_vocab_size_must_cover_the_dataset_vocabulary() -> None:
    err = _build_error(_text_model(10), TEXT, num_classes=2, vocab_size=88)
    assert err.loc == ("model", "layers", 0, "vocab_size")
    assert (err.layer, err.layer_type, err.field) == (0, "embedding", "vocab_size")
    assert str(err).startswith("model.layers[0].vocab_size (embedding): vocab_size 10 ")
    assert "vocabulary of 88 tokens" in str(err) and "at least 88" in str(err)
    build_model(_text_model(88), TEXT, num_classes=2, vocab_size=88)
    build_model(_text_model(10), TEXT, num_classes=2)  # vocabulary unknown: not checked


@pytest.mark.parametrize(
    ("betas", "index"),
    [((1.0, 2.0), 0), ((0.9, 1.0), 1), ((-0.1, 0.999), 0), ((float("nan"), 0.999), 0)],
    ids=["one", "second-one", "negative", "nan"],
)
@pytest.mark.parametrize("kind", ["adam", "adamw"])
def test_adam_betas_lie_in_zero_to_one(kind: str, betas: tuple[float, float], index: int) -> None:
    """As torch.optim.Adam: "Invalid beta parameter at index 0"; a beta of 1 divides by zero."""
    model = build_model(_model(*FLAT, *HEAD), DIGITS)
    with pytest.raises(SpecError) as info:
        build_optimizer({"type": kind, "lr": 0.001, "betas": betas}, model)
    assert info.value.loc == ("optimizer", "betas", index) and info.value.field == "betas"
    assert str(info.value).startswith(f"optimizer.betas[{index}]: ")
    build_optimizer({"type": kind, "lr": 0.001, "betas": (0.0, 0.99)}, model)


@pytest.mark.parametrize(
    "settings",
    [{"nesterov": True}, {"nesterov": True, "momentum": 0.9, "dampening": 0.1}],
    ids=["no-momentum", "dampening"],
)
def test_nesterov_needs_momentum_and_no_dampening(settings: dict[str, Any]) -> None:
    """As torch.optim.SGD ("Nesterov momentum requires a momentum and zero dampening"):
    otherwise the update would silently be another rule."""
    model = build_model(_model(*FLAT, *HEAD), DIGITS)
    with pytest.raises(SpecError) as info:
        build_optimizer({"type": "sgd", "lr": 0.1, **settings}, model)
    momentum, dampening = settings.get("momentum", 0.0), settings.get("dampening", 0.0)
    assert str(info.value) == (
        f"optimizer.nesterov: nesterov needs momentum > 0 and dampening 0, got momentum "
        f"{momentum} and dampening {dampening}"
    )
    build_optimizer({"type": "sgd", "lr": 0.1, "nesterov": True, "momentum": 0.9}, model)


def test_unknown_loss() -> None:
    err = _build_error(_model(*FLAT, *HEAD, loss="hinge"))
    assert err.loc == ("model", "loss")


@pytest.mark.parametrize("lr", [0.0, -1.0, 11.0])
def test_optimizer_lr_out_of_bounds(lr: float) -> None:
    model = build_model(_model(*FLAT, *HEAD), DIGITS)
    with pytest.raises(SpecError) as info:
        build_optimizer({"type": "adam", "lr": lr}, model)
    assert info.value.loc == ("optimizer", "lr") and info.value.field == "lr"
    assert str(info.value).startswith("optimizer.lr: ")

    with pytest.raises(SpecError) as in_job:
        parse_job_spec(digits_job(optimizer={"type": "sgd", "lr": lr}))
    assert in_job.value.loc == ("optimizer", "lr")


def test_unknown_optimizer() -> None:
    with pytest.raises(SpecError) as info:
        parse_job_spec(digits_job(optimizer={"type": "rmsprop", "lr": 0.1}))
    assert info.value.loc == ("optimizer", "type")
    assert "unknown type 'rmsprop'" in str(info.value)


@pytest.mark.parametrize("workers", [0, 65, "many"])
def test_job_resources_workers_out_of_bounds(workers: Any) -> None:
    job = {**digits_job(), "resources": {"workers": workers}}
    with pytest.raises(SpecError) as info:
        parse_job_spec(job)
    assert info.value.loc == ("resources", "workers")
    assert info.value.field == "workers" and info.value.layer is None
    assert str(info.value).startswith("resources.workers: ")


def test_layer_error_inside_a_job_spec_names_the_path_from_the_job() -> None:
    job = digits_job(_model(*FLAT, {"type": "dense", "units": 0}))
    with pytest.raises(SpecError) as info:
        parse_job_spec(job)
    assert info.value.loc == ("model", "layers", 1, "units") and info.value.layer == 1


def test_the_example_job_is_valid() -> None:
    job = parse_job_spec(example_job())
    assert job.model.layers[0].type == "conv2d"
    assert job.training.epochs == 20 and job.resources.workers == 1


def test_format_loc() -> None:
    assert format_loc(("model", "layers", 3, "units")) == "model.layers[3].units"
    assert format_loc(("resources", "workers")) == "resources.workers"


# --- summaries ----------------------------------------------------------------------------


def test_summary_of_a_small_cnn_counts_params_and_flops() -> None:
    spec = _model(
        {"type": "conv2d", "filters": 4, "kernel_size": 3, "padding": 1},
        {"type": "relu"},
        {"type": "maxpool2d", "pool_size": 2},
        {"type": "flatten"},
        {"type": "dense", "units": 10},
    )
    summary = summarize(spec, DIGITS, num_classes=10)
    rows = [(layer.type, layer.output_shape, layer.params, layer.flops) for layer in summary.layers]
    assert rows == [
        # conv: W 4*1*3*3 + b 4; each of 8*8*4 outputs does 9 multiply-adds and a bias add
        ("conv2d", (4, 8, 8), 40, 8 * 8 * 4 * (2 * 9 + 1)),
        # one comparison per output
        ("relu", (4, 8, 8), 0, 256),
        # 2x2 windows: 4 reads per output
        ("maxpool2d", (4, 4, 4), 0, 4 * 4 * 4 * 4),
        ("flatten", (64,), 0, 0),
        # dense: W 64*10 + b 10; 64 multiply-adds and a bias add per output
        ("dense", (10,), 650, 10 * (2 * 64 + 1)),
    ]
    assert summary.params == 690
    assert summary.flops == 4864 + 256 + 256 + 0 + 1290
    assert summary.output_shape == (10,)
    text = str(summary)
    assert "690" in text and "6,666" in text and "conv2d(filters=4" in text


def test_summary_of_strided_conv_and_3d_dense() -> None:
    conv = summarize(
        _model({"type": "conv2d", "filters": 6, "kernel_size": 3, "stride": 2}, loss="mse"),
        (3, 9, 7),
    )
    # (9 - 3) // 2 + 1 = 4 rows, (7 - 3) // 2 + 1 = 3 columns
    assert conv.layers[0].output_shape == (6, 4, 3)
    assert conv.params == 6 * 3 * 9 + 6
    assert conv.flops == 4 * 3 * 6 * (2 * 27 + 1)

    dense = summarize(_model({"type": "dense", "units": 3}, loss="mse"), (5, 4))
    assert dense.layers[0].output_shape == (5, 3)
    assert dense.params == 4 * 3 + 3
    assert dense.flops == 5 * (2 * 4 * 3 + 3)


def test_model_summary_matches_its_parameters() -> None:
    model = build_model(example_job()["model"], DIGITS)
    summary = model.summary()
    assert summary.params == model.num_params == 16 * 9 + 16 + 256 * 64 + 64 + 64 * 10 + 10
