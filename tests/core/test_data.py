"""Built-in datasets, uploaded .npz arrays, and the seeded splits and orders of training."""

from __future__ import annotations

import io
from importlib import resources
from pathlib import Path

import numpy as np
import pytest

from core import DatasetUnavailable, load_dataset
from core.data import (
    FASHION_MNIST_DIR,
    batch_slices,
    dataset_from_arrays,
    epoch_order,
    load_digits,
    load_fashion_mnist,
    load_npz,
    split_indices,
)

DIGITS_TOTAL = 1797
DIGITS_TEST = 360  # ceil(20% of 1,797)


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def test_digits_shapes_ranges_and_labels(digits) -> None:
    assert digits.name == "digits" and digits.kind == "image"
    assert digits.input_shape == (1, 8, 8) and digits.num_classes == 10
    assert digits.class_names == tuple("0123456789")
    assert digits.X.shape == (DIGITS_TOTAL - DIGITS_TEST, 1, 8, 8)
    assert digits.X_test is not None and digits.y_test is not None
    assert digits.X_test.shape == (DIGITS_TEST, 1, 8, 8)
    for X in (digits.X, digits.X_test):
        assert X.dtype == np.float32
        assert X.min() == 0.0 and X.max() == 1.0
    for y in (digits.y, digits.y_test):
        assert y.dtype == np.int64
        assert set(np.unique(y)) == set(range(10))
    assert len(digits) == len(digits.y) == DIGITS_TOTAL - DIGITS_TEST


def test_digits_test_split_is_fixed_and_partitions_the_images(digits) -> None:
    again = load_digits()
    np.testing.assert_array_equal(again.X_test, digits.X_test)
    np.testing.assert_array_equal(again.y_test, digits.y_test)
    np.testing.assert_array_equal(again.X, digits.X)

    with resources.files("core.datasets").joinpath("digits.npz").open("rb") as handle:
        with np.load(handle, allow_pickle=False) as archive:
            raw_X, raw_y = archive["X"], archive["y"]
    assert len(raw_X) == DIGITS_TOTAL

    def rows(X: np.ndarray, y: np.ndarray) -> np.ndarray:
        table = np.concatenate([X.reshape(len(X), -1), y[:, None].astype(X.dtype)], axis=1)
        return table[np.lexsort(table.T[::-1])]

    # train and test together are exactly the shipped samples, each once
    assert digits.X_test is not None and digits.y_test is not None
    together = rows(
        np.concatenate([digits.X, digits.X_test]) * 16, np.concatenate([digits.y, digits.y_test])
    )
    np.testing.assert_array_equal(together, rows(raw_X.astype(np.float32), raw_y))


def test_load_dataset_by_name_and_unknown_names() -> None:
    assert load_dataset("digits").input_shape == (1, 8, 8)
    with pytest.raises(KeyError, match="unknown dataset 'imagenet'"):
        load_dataset("imagenet")


@pytest.mark.skipif(
    not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason="fashion_mnist needs 'apt-get install dataset-fashion-mnist'",
)
def test_fashion_mnist_standard_split() -> None:
    data = load_dataset("fashion_mnist")
    assert data.input_shape == (1, 28, 28) and data.num_classes == 10
    assert len(data.class_names) == 10 and data.class_names[0] == "T-shirt/top"
    assert data.X.shape == (60_000, 1, 28, 28) and data.y.shape == (60_000,)
    assert data.X_test is not None and data.y_test is not None
    assert data.X_test.shape == (10_000, 1, 28, 28) and data.y_test.shape == (10_000,)
    for X in (data.X, data.X_test):
        assert X.dtype == np.float32 and X.min() == 0.0 and X.max() == 1.0
    for y in (data.y, data.y_test):
        assert y.dtype == np.int64
        np.testing.assert_array_equal(np.bincount(y), [len(y) // 10] * 10)  # balanced classes


def test_fashion_mnist_missing_files_say_how_to_install(tmp_path: Path) -> None:
    with pytest.raises(DatasetUnavailable) as info:
        load_fashion_mnist(tmp_path)
    assert "apt-get install dataset-fashion-mnist" in str(info.value)
    assert str(tmp_path) in str(info.value)


# --- uploads ----------------------------------------------------------------------------


def _npz(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def test_load_npz_images_and_tabular(rng: np.random.Generator) -> None:
    images = load_npz(
        _npz(X=rng.random((6, 1, 4, 4)), y=np.array([0, 1, 2, 0, 1, 2])), name="shapes"
    )
    assert images.kind == "image" and images.input_shape == (1, 4, 4)
    assert images.num_classes == 3 and images.X.dtype == np.float32 and images.y.dtype == np.int64
    table = load_npz(_npz(X=rng.random((5, 3)), y=rng.random(5)), name="regression")
    assert table.kind == "tabular" and table.num_classes is None and table.y.dtype == np.float32


class _Marker:
    """Unpickling this object would create ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


@pytest.mark.parametrize("which", ["X", "y"])
def test_load_npz_refuses_object_arrays_without_unpickling(which: str, tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    payload = np.empty(3, dtype=object)
    payload[:] = [_Marker(marker)] * 3
    arrays = {"X": np.zeros((3, 2)), "y": np.zeros(3, dtype=np.int64), which: payload}
    with pytest.raises(ValueError, match=f"array '{which}' holds Python objects, which are never"):
        load_npz(_npz(**arrays), name="evil")
    assert not marker.exists()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"hello\n", "not an .npz archive: expected the zip of arrays 'X' and 'y'"),
        (b"", "not an .npz archive"),
        (b"\x93NUMPY\x01\x00", "not an .npz archive"),  # one .npy array, not an archive
        (_npz(X=np.zeros((3, 2)), y=np.zeros(3))[:60], "not a readable .npz archive"),
    ],
)
def test_load_npz_names_what_is_wrong_with_a_file_that_is_not_an_archive(
    data: bytes, message: str
) -> None:
    with pytest.raises(ValueError, match=message) as info:
        load_npz(data, name="broken")
    assert "pickle" not in str(info.value)


@pytest.mark.parametrize("missing", ["X", "y"])
def test_load_npz_needs_x_and_y(missing: str) -> None:
    arrays = {"X": np.zeros((3, 2)), "y": np.zeros(3, dtype=np.int64)}
    del arrays[missing]
    with pytest.raises(ValueError, match="arrays named 'X' and 'y'"):
        load_npz(_npz(**arrays, other=np.zeros(3)), name="partial")


@pytest.mark.parametrize(
    ("X", "y", "message"),
    [
        (np.array([["a", "b"]]), np.array([0]), "numeric"),
        (np.zeros((3, 2)), np.zeros(2, dtype=np.int64), "must be"),
        (np.zeros(3), np.zeros(3, dtype=np.int64), "must be"),
        (np.array([[np.nan, 1.0]]), np.array([0]), "NaN"),
        (np.zeros((2, 2)), np.array([0, -1]), ">= 0"),
    ],
    ids=["strings", "length-mismatch", "one-dimensional", "nan", "negative-label"],
)
def test_dataset_from_arrays_validates(X: np.ndarray, y: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        dataset_from_arrays(X, y, name="bad")


# --- splits and orders ----------------------------------------------------------------


@pytest.mark.parametrize(("n", "fraction"), [(100, 0.1), (1437, 0.2), (7, 0.5), (50, 0.0)])
def test_split_indices_is_a_seeded_disjoint_partition(n: int, fraction: float) -> None:
    train, val = split_indices(n, fraction, seed=3)
    assert len(val) == round(n * fraction)
    assert np.intersect1d(train, val).size == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), np.arange(n))
    assert np.all(np.diff(train) > 0) and np.all(np.diff(val) > 0)
    again_train, again_val = split_indices(n, fraction, seed=3)
    np.testing.assert_array_equal(again_train, train)
    np.testing.assert_array_equal(again_val, val)


def test_split_indices_depends_on_the_seed() -> None:
    assert not np.array_equal(
        split_indices(200, 0.2, seed=0)[1], split_indices(200, 0.2, seed=1)[1]
    )


def test_epoch_order_is_a_permutation_fixed_by_seed_and_epoch() -> None:
    first = epoch_order(50, seed=4, epoch=0)
    np.testing.assert_array_equal(np.sort(first), np.arange(50))
    np.testing.assert_array_equal(epoch_order(50, seed=4, epoch=0), first)
    assert not np.array_equal(epoch_order(50, seed=4, epoch=1), first)
    assert not np.array_equal(epoch_order(50, seed=5, epoch=0), first)
    np.testing.assert_array_equal(epoch_order(50, seed=4, epoch=3, shuffle=False), np.arange(50))


def test_batch_slices_cover_every_sample_once() -> None:
    slices = list(batch_slices(10, 4))
    assert [(s.start, s.stop) for s in slices] == [(0, 4), (4, 8), (8, 10)]
    assert list(batch_slices(8, 4))[-1] == slice(4, 8)
