"""Groups of samples run as one batch: each group's gradients are those it gets alone."""

from __future__ import annotations

from itertools import pairwise
from typing import Any

import numpy as np
import pytest

from core import Trainer, build_model
from core.layers.base import add_along
from core.spec import TrainingSpec
from workers.allreduce import span_tree

MLP: dict[str, Any] = {
    "layers": [
        {"type": "dense", "units": 64},
        {"type": "relu"},
        {"type": "dense", "units": 48},
        {"type": "leaky_relu", "negative_slope": 0.1},
        {"type": "dense", "units": 5},
    ],
    "loss": "softmax_cross_entropy",
}
IMAGES: dict[str, Any] = {
    "layers": [
        {"type": "flatten"},
        {"type": "dense", "units": 16},
        {"type": "relu"},
        {"type": "dense", "units": 3},
    ],
    "loss": "softmax_cross_entropy",
}
SEQUENCES: dict[str, Any] = {
    "layers": [{"type": "dense", "units": 12}, {"type": "relu"}, {"type": "dense", "units": 4}],
    "loss": "softmax_cross_entropy",
}
SMOOTH: dict[str, Any] = {
    "layers": [
        {"type": "dense", "units": 40},
        {"type": "gelu"},
        {"type": "dense", "units": 24},
        {"type": "tanh"},
        {"type": "dense", "units": 12},
        {"type": "sigmoid"},
        {"type": "dense", "units": 3},
    ],
    "loss": "softmax_cross_entropy",
}
NORMALIZED: dict[str, Any] = {
    "layers": [
        {"type": "dense", "units": 24},
        {"type": "layernorm"},
        {"type": "relu"},
        {"type": "dense", "units": 16},
        {"type": "layernorm"},
        {"type": "dense", "units": 4},
    ],
    "loss": "softmax_cross_entropy",
}
SAME_SHAPES: dict[str, Any] = {
    "layers": [
        {"type": "dense", "units": 12},
        {"type": "relu"},
        {"type": "dense", "units": 12},
        {"type": "relu"},
        {"type": "dense", "units": 12},
        {"type": "tanh"},
        {"type": "dense", "units": 3},
    ],
    "loss": "softmax_cross_entropy",
}
CASES = {
    "mlp-equal-groups": (MLP, (30,), 5, [16, 16, 16, 16]),
    # Groups of one row take BLAS's matrix-vector kernel: they go one by one.
    "mlp-uneven-groups": (MLP, (30,), 5, [1, 2, 3, 17, 1, 8]),
    "images": (IMAGES, (2, 5, 5), 3, [7, 9, 4]),
    # Elementwise functions: an element's value may not depend on where it lies.
    "smooth-activations": (SMOOTH, (17,), 3, [5, 11, 1, 16, 3]),
    "sequences": (SEQUENCES, (6, 10), 4, [3, 5, 2]),
    # Per-row statistics, as products checked like the others; per-group gamma and beta.
    "layernorm": (NORMALIZED, (9,), 4, [16, 1, 7, 16, 3]),
    # Layers of one shape share the partial sums of their trees.
    "same-shapes": (SAME_SHAPES, (12,), 3, [4, 4, 4, 4, 4, 4, 4, 4]),
}


def _trainer(spec: dict[str, Any], input_shape: tuple[int, ...], classes: int) -> Trainer:
    return Trainer(
        model_spec=spec,
        optimizer_spec={"type": "sgd", "lr": 0.1},
        training=TrainingSpec(batch_size=64, seed=3),
        input_shape=input_shape,
        num_classes=classes,
    )


def _batch(case: str, rng: np.random.Generator) -> tuple[list[int], np.ndarray, np.ndarray]:
    """The case's group bounds, and a random batch of its groups' samples and labels."""
    _, input_shape, classes, sizes = CASES[case]
    bounds = np.cumsum([0, *sizes]).tolist()
    x = rng.standard_normal((bounds[-1], *input_shape)).astype(np.float32)
    label_shape = (bounds[-1], input_shape[0]) if case == "sequences" else (bounds[-1],)
    return bounds, x, rng.integers(0, classes, size=label_shape)


@pytest.mark.parametrize("case", list(CASES))
def test_group_gradients_equal_each_group_alone(case: str, rng: np.random.Generator) -> None:
    spec, input_shape, classes, sizes = CASES[case]
    bounds, x, y = _batch(case, rng)
    total = bounds[-1] + 5  # the groups are part of a larger batch

    alone = _trainer(spec, input_shape, classes)
    size = alone.model.num_params
    expected = [np.zeros(size, np.float32) for _ in sizes]
    expected_stats = []
    for row, (lo, hi) in zip(expected, pairwise(bounds), strict=True):
        alone.model.bind_grads(row)
        alone.model.zero_grad()
        expected_stats.append(alone.compute_gradients(x[lo:hi], y[lo:hi], scale=(hi - lo) / total))

    grouped = _trainer(spec, input_shape, classes)
    assert grouped.model.groupable
    for _ in range(2):  # the first run checks whether whole products agree; the second trusts it
        rows = [np.full(size, np.nan, np.float32) for _ in sizes]
        stats = grouped.compute_group_gradients(x, y, bounds, rows, total=total)
        assert stats == expected_stats
        for i, (got, want) in enumerate(zip(rows, expected, strict=True)):
            np.testing.assert_array_equal(got, want, err_msg=f"group {i}")
    # Back to one batch: the gradients go to the layers' own arrays again.
    grouped.model.zero_grad()
    grouped.compute_gradients(x, y)
    alone.model.bind_grads(np.zeros(size, np.float32))
    alone.model.zero_grad()
    alone.compute_gradients(x, y)
    for (name, _, got), (_, _, want) in zip(
        grouped.model.parameters(), alone.model.parameters(), strict=True
    ):
        np.testing.assert_array_equal(got, want, err_msg=name)


@pytest.mark.parametrize("case", list(CASES))
def test_group_gradients_added_along_trees(case: str, rng: np.random.Generator) -> None:
    """With trees, each row receives the sum of its groups' gradients, added pairwise
    along its tree: bit for bit what adding the groups' own rows that way gives."""
    spec, input_shape, classes, sizes = CASES[case]
    bounds, x, y = _batch(case, rng)
    grouped = _trainer(spec, input_shape, classes)
    size = grouped.model.num_params
    each = [np.zeros(size, np.float32) for _ in sizes]
    alone = grouped.compute_group_gradients(x, y, bounds, each, total=bounds[-1])
    n = len(sizes)
    # the all-reduce's whole tree; a group alone and a subtree (as a rank holding
    # slots 0 and 1..n-1)
    for trees in ([span_tree((0, n))], [0, span_tree((1, n))]):
        for _ in range(2):  # a second run reuses the partial sums' scratch arrays
            rows = [np.full(size, np.nan, np.float32) for _ in trees]
            stats = grouped.compute_group_gradients(
                x, y, bounds, rows, total=bounds[-1], trees=trees
            )
            assert stats == alone
            for tree, got in zip(trees, rows, strict=True):
                np.testing.assert_array_equal(got, add_along(tree, each), err_msg=str(tree))


def test_layers_share_the_partial_sums_of_their_trees(rng: np.random.Generator) -> None:
    bounds, x, y = _batch("same-shapes", rng)
    grouped = _trainer(*CASES["same-shapes"][:3])
    rows = [np.zeros(grouped.model.num_params, np.float32)]
    grouped.compute_group_gradients(x, y, bounds, rows, total=bounds[-1], trees=[span_tree((0, 8))])
    scratch = {id(layer._tree_scratch) for layer in grouped.model.layers}
    assert len(scratch) == 1
    shared = grouped.model.layers[0]._tree_scratch
    # eight groups: partial sums at depths 0, 1 and 2 for each of the four shapes
    # (12, 12) and (12,) of the three 12-unit layers, (12, 3) and (3,) of the last
    assert sorted(key[0] for key in shared) == sorted([(12, 12), (12,), (12, 3), (3,)] * 3)


@pytest.mark.parametrize(
    "layer",
    [
        {"type": "dropout", "rate": 0.5},
        {"type": "batchnorm"},
    ],
)
def test_models_whose_samples_interact_or_draw_do_not_group(layer: dict[str, Any]) -> None:
    spec = {"layers": [{"type": "dense", "units": 8}, layer, {"type": "dense", "units": 3}]}
    model = build_model({**spec, "loss": "softmax_cross_entropy"}, (5,), num_classes=3)
    assert not model.groupable
    with pytest.raises(ValueError, match="groupable"):
        model.set_groups([0, 2, 4], [np.zeros(model.num_params, np.float32)] * 2)


def test_gradient_views_are_kept_for_a_bounded_number_of_rows() -> None:
    """Views of a row are handed out again for the same row; rows handed in anew each
    time (slices of a 2-D array) do not pile up."""
    model = build_model(MLP, (30,), num_classes=5)
    rows = np.zeros((2, model.num_params), np.float32)
    row = rows[0]
    first = model.grad_views(row)
    assert model.grad_views(row) is first
    for _ in range(1000):
        views = model.grad_views(rows[1])  # a new view object each time
        np.testing.assert_array_equal(np.concatenate([v.reshape(-1) for v in views]), rows[1])
    assert len(model.__dict__["_grad_views"]) <= 64


def test_a_dense_layer_gives_each_group_its_rows_from_a_strided_input(
    rng: np.random.Generator,
) -> None:
    model = build_model(MLP, (30,), num_classes=5)
    dense = model.layers[0]
    wide = rng.standard_normal((24, 60)).astype(np.float32)
    x = wide[:, ::2]  # not contiguous
    bounds = [0, 5, 16, 24]
    dense.set_groups(bounds, [{} for _ in bounds[1:]])
    got = dense.forward(x, training=False)
    dense.set_groups(None)
    for lo, hi in pairwise(bounds):
        np.testing.assert_array_equal(got[lo:hi], dense.forward(x[lo:hi].copy(), False))
