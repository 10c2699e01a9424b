"""Datasets: arrays plus what a model needs to know about them.

Images are float32, channels-first ``(N, C, H, W)``, scaled to [0, 1]; labels
are int64 class indices. Built in: ``digits`` (shipped in this package) and
``fashion_mnist`` (read from Debian's ``dataset-fashion-mnist`` files).

Text datasets (``kind`` ``text_lm`` or ``text_classification``, built by
:mod:`core.text`) hold int64 token ids ``X: (N, time)``; their ``meta`` holds the
vocabulary (``meta["tokenizer"]``), which the trainer saves with the model.
Built in: ``tiny_corpus``, ``tiny_sentiment`` (both shipped) and ``fortunes``
(Debian's ``fortunes`` files).
"""

from __future__ import annotations

import gzip
import io
import math
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


class DatasetUnavailable(RuntimeError):
    """A built-in dataset whose files are not on this machine; the message says how to get them."""


@dataclass(frozen=True)
class Dataset:
    """Training pool ``X, y`` and, where the dataset defines one, its standard test split."""

    name: str
    X: np.ndarray
    y: np.ndarray
    input_shape: tuple[int, ...]
    num_classes: int | None
    class_names: tuple[str, ...] = ()
    X_test: np.ndarray | None = None
    y_test: np.ndarray | None = None
    kind: str = "image"
    meta: dict[str, object] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.X)


def load_digits() -> Dataset:
    """The 8x8 handwritten digits (1,797 images); a fixed 20% is the test split."""
    with resources.files("core.datasets").joinpath("digits.npz").open("rb") as handle:
        with np.load(handle, allow_pickle=False) as archive:
            images, labels = archive["X"], archive["y"]
    X = (images.astype(np.float32) / 16.0)[:, None, :, :]
    y = labels.astype(np.int64)
    order = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(len(X))
    n_test = math.ceil(len(X) * DIGITS_TEST_FRACTION)
    test, train = order[:n_test], np.sort(order[n_test:])
    return Dataset(
        name="digits",
        X=X[train],
        y=y[train],
        input_shape=(1, 8, 8),
        num_classes=10,
        class_names=tuple(str(d) for d in range(10)),
        X_test=X[test],
        y_test=y[test],
    )


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format): big-endian magic, dimensions, then uint8 data."""
    with gzip.open(path, "rb") as handle:
        raw = handle.read()
    magic = int.from_bytes(raw[0:4], "big")
    if magic >> 8 != 0x08:  # 0x08: unsigned bytes
        raise ValueError(f"{path.name}: not an unsigned-byte IDX file")
    ndim = magic & 0xFF
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    return data.reshape(dims)


def load_fashion_mnist(directory: Path = FASHION_MNIST_DIR) -> Dataset:
    """Fashion-MNIST: 60,000 training and 10,000 test images of 28x28, 10 classes."""
    names = {
        "train_images": "train-images-idx3-ubyte.gz",
        "train_labels": "train-labels-idx1-ubyte.gz",
        "test_images": "t10k-images-idx3-ubyte.gz",
        "test_labels": "t10k-labels-idx1-ubyte.gz",
    }
    paths = {key: directory / name for key, name in names.items()}
    missing = [p for p in paths.values() if not p.is_file()]
    if missing:
        raise DatasetUnavailable(
            f"fashion_mnist needs {missing[0]}; install it with "
            "'apt-get install dataset-fashion-mnist'"
        )
    arrays = {key: _read_idx(path) for key, path in paths.items()}

    def images(raw: np.ndarray) -> np.ndarray:
        return (raw.astype(np.float32) * (1.0 / 255.0))[:, None, :, :]

    return Dataset(
        name="fashion_mnist",
        X=images(arrays["train_images"]),
        y=arrays["train_labels"].astype(np.int64),
        input_shape=(1, 28, 28),
        num_classes=10,
        class_names=FASHION_MNIST_CLASSES,
        X_test=images(arrays["test_images"]),
        y_test=arrays["test_labels"].astype(np.int64),
    )


def _builtin_text(name: str) -> Callable[[], Dataset]:
    def load() -> Dataset:
        from core.text import BUILTIN_TEXT_DATASETS  # core.text builds on this module

        return BUILTIN_TEXT_DATASETS[name]()

    load.__name__ = f"load_{name}"
    return load


BUILTIN_DATASETS: dict[str, Callable[[], Dataset]] = {
    "digits": load_digits,
    "fashion_mnist": load_fashion_mnist,
    # Text, in core.text: tiny_corpus and tiny_sentiment are shipped, fortunes is Debian's.
    "tiny_corpus": _builtin_text("tiny_corpus"),
    "tiny_sentiment": _builtin_text("tiny_sentiment"),
    "fortunes": _builtin_text("fortunes"),
}


def load_dataset(name: str) -> Dataset:
    """A built-in dataset by name."""
    try:
        loader = BUILTIN_DATASETS[name]
    except KeyError:
        raise KeyError(
            f"unknown dataset {name!r}; built in: {', '.join(sorted(BUILTIN_DATASETS))}"
        ) from None
    return loader()


#: How a zip archive starts (``numpy.savez`` writes one): a file, or an empty archive.
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")


def load_npz(data: bytes, *, name: str) -> Dataset:
    """A dataset from ``.npz`` bytes with arrays ``X`` and ``y`` (never unpickled)."""
    if not data.startswith(_ZIP_MAGIC):  # np.load would try a pickle, and say so
        raise ValueError(
            "not an .npz archive: expected the zip of arrays 'X' and 'y' that numpy.savez writes"
        )
    try:
        archive = np.load(io.BytesIO(data), allow_pickle=False)
    except (zipfile.BadZipFile, EOFError) as exc:
        raise ValueError(f"not a readable .npz archive: {exc}") from None
    with archive:
        if "X" not in archive or "y" not in archive:
            raise ValueError("an .npz dataset needs arrays named 'X' and 'y'")
        X, y = (_numeric_array(archive, key) for key in ("X", "y"))
    return dataset_from_arrays(X, y, name=name)


def _numeric_array(archive: Any, key: str) -> np.ndarray:
    try:
        return archive[key]
    except ValueError as exc:
        if "allow_pickle" in str(exc):  # an object array, which only unpickling could read
            raise ValueError(
                f"array {key!r} holds Python objects, which are never unpickled: "
                "X and y must be numeric arrays"
            ) from None
        raise ValueError(f"array {key!r} cannot be read: {exc}") from None
    except (zipfile.BadZipFile, EOFError, OSError) as exc:
        raise ValueError(f"array {key!r} cannot be read: {exc}") from None


def dataset_from_arrays(X: np.ndarray, y: np.ndarray, *, name: str) -> Dataset:
    """Validate arrays and wrap them: numeric ``X`` (N, ...), labels ``y`` (N,)."""
    if X.dtype.kind not in "biuf" or y.dtype.kind not in "biuf":
        raise ValueError("X and y must be numeric arrays")
    if X.ndim < 2 or len(X) != len(y) or len(X) == 0:
        raise ValueError(f"X must be (N, ...) and y (N,), got {X.shape} and {y.shape}")
    if not np.isfinite(X).all():
        raise ValueError("X holds NaN or infinite values")
    is_classes = y.dtype.kind in "biu" and y.ndim == 1
    if is_classes and y.min() < 0:
        raise ValueError("class labels must be >= 0")
    return Dataset(
        name=name,
        X=X.astype(np.float32),
        y=y.astype(np.int64) if is_classes else y.astype(np.float32),
        input_shape=tuple(int(d) for d in X.shape[1:]),
        num_classes=int(y.max()) + 1 if is_classes else None,
        kind="image" if X.ndim == 4 else "tabular",
    )


def split_indices(n: int, validation_split: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded ``(train, validation)`` index arrays, each sorted."""
    order = np.random.default_rng([seed, 0xDA7A]).permutation(n)
    n_val = int(round(n * validation_split))
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The sample order of one epoch: a seeded permutation that depends only on (seed, epoch)."""
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([seed, 0x5EED, epoch]).permutation(n)


def batch_slices(n: int, batch_size: int) -> Iterator[slice]:
    """Consecutive slices of ``batch_size`` (the last may be shorter)."""
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))
