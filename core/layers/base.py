"""The layer contract.

A layer is built in two stages: :meth:`Layer.infer` checks the spec against the
per-sample input shape and returns the output shape (nothing is allocated, so
the service can validate a spec cheaply), then :meth:`Layer.init` allocates the
parameters. ``forward(x, training)`` caches what ``backward`` needs;
``backward(dy)`` accumulates into ``grads`` (same keys as ``params``) and
returns ``dx``.

Shapes in specs and summaries are logical, per sample and channels-first:
an image is ``(C, H, W)``. Inside the engine a batch of images travels as
``(N, H, W, C)`` (channels last), so that a convolution is one matrix product
with no transposes; :class:`core.model.Model` converts at its edges.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import pairwise
from types import ModuleType
from typing import Any, ClassVar, TypeAlias

import numpy as np

Shape = tuple[int, ...]
#: Groups whose gradients are added up: a group's index, or two trees whose sums are
#: added, left + right (see :meth:`Layer.set_groups`).
GroupTree: TypeAlias = int | tuple["GroupTree", "GroupTree"]


def add_along(tree: GroupTree, values: Sequence[Any]) -> Any:
    """``values[i]`` for the leaves ``i`` of ``tree``, added pairwise as ``left + right``
    (arrays or NumPy scalars: the numbers :meth:`Layer._tree_sum` makes)."""
    if isinstance(tree, int):
        return values[tree]
    return add_along(tree[0], values) + add_along(tree[1], values)


class ShapeError(ValueError):
    """A spec that does not fit its input; the model builder adds the layer index."""

    def __init__(self, reason: str, field: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.field = field


class Layer:
    type: ClassVar[str]
    #: Initialisation follows the next activation: He for (leaky) ReLU, Xavier otherwise.
    has_weights: ClassVar[bool] = False
    #: Whether a batch made of groups of samples can run through this layer whole and
    #: give every group the numbers it gets running alone: the layer treats each sample
    #: by itself, elementwise or through products it checks (:meth:`_grouped_matmul`),
    #: and, if it has parameters, takes each group's gradients apart (see
    #: :meth:`set_groups`). Elementwise functions give an element the same value
    #: wherever it lies in an array: NumPy's vector loops load an array's tail masked.
    groupable: ClassVar[bool] = False

    def __init__(self, spec: Any) -> None:
        self.spec = spec
        self.params: dict[str, Any] = {}
        self.grads: dict[str, Any] = {}
        self.buffers: dict[str, Any] = {}
        self.input_shape: Shape = ()
        self.output_shape: Shape = ()
        #: False for the first layer: nobody needs the gradient of the data.
        self.needs_input_grad = True
        self.xp: ModuleType = np
        self.dtype: Any = np.float32
        #: Random source of layers that draw (dropout); the model sets it.
        self.rng: np.random.Generator = np.random.default_rng(0)
        self._overwrite_grads = True
        #: Set by :meth:`set_groups`: sample bounds of the groups, where their gradients
        #: go, and which groups' sum each of those receives.
        self._groups: tuple[int, ...] | None = None
        self._group_grads: list[dict[str, Any]] = []
        self._group_trees: list[GroupTree] = []
        #: Partial sums of :meth:`_tree_sum`, per shape, dtype and depth (see
        #: :meth:`share_tree_scratch`).
        self._tree_scratch: dict[tuple[Any, ...], Any] = {}
        #: Per product shape and group sizes: whether one product of the whole batch
        #: gives each group's rows exactly (see :meth:`_grouped_matmul`).
        self._rows_agree: dict[tuple[Any, ...], bool] = {}

    # --- building ---------------------------------------------------------------

    def infer(self, input_shape: Shape) -> Shape:
        """Check the spec against ``input_shape`` (per sample) and return the output shape."""
        self.input_shape = tuple(input_shape)
        self.output_shape = tuple(self._infer(self.input_shape))
        return self.output_shape

    def _infer(self, input_shape: Shape) -> Shape:
        return input_shape

    def param_shapes(self) -> dict[str, Shape]:
        return {}

    def buffer_shapes(self) -> dict[str, Shape]:
        return {}

    def flops(self) -> int:
        """Forward FLOPs per sample (a multiply-add counts two)."""
        return math.prod(self.output_shape)

    def init(self, xp: ModuleType, dtype: Any, rng: np.random.Generator, *, he: bool) -> None:
        """Allocate parameters (drawn on the CPU from ``rng``, so every device agrees)."""
        self.xp = xp
        self.dtype = np.dtype(dtype)
        for name, shape in self.param_shapes().items():
            value = self._initial_value(name, shape, rng, he=he)
            self.params[name] = xp.asarray(value.astype(self.dtype))
            self.grads[name] = xp.zeros(shape, dtype=self.dtype)
        for name, shape in self.buffer_shapes().items():
            self.buffers[name] = xp.asarray(self._initial_buffer(name, shape).astype(self.dtype))

    def _initial_value(
        self, name: str, shape: Shape, rng: np.random.Generator, *, he: bool
    ) -> np.ndarray:
        return np.zeros(shape)

    def _initial_buffer(self, name: str, shape: Shape) -> np.ndarray:
        return np.zeros(shape)

    # --- running ------------------------------------------------------------------

    def forward(self, x: Any, training: bool) -> Any:
        raise NotImplementedError

    def backward(self, dy: Any) -> Any:
        raise NotImplementedError

    def zero_grad(self) -> None:
        """Make the next backward overwrite the gradients instead of adding to them."""
        self._overwrite_grads = True

    def backward_no_samples(self) -> None:
        """The backward of a batch of no samples: it adds nothing to the gradients (which
        are zero if this backward was to overwrite them)."""
        if self._overwrite_grads:
            for grad in self.grads.values():
                grad[...] = 0
        self._grads_done()

    def _accumulate(self, name: str, value: Any) -> None:
        grad = self.grads[name]
        if self._overwrite_grads:
            grad[...] = value
        else:
            grad += value

    def _accumulate_matmul(self, name: str, a: Any, b: Any) -> None:
        """``grads[name] += a @ b`` without a temporary on the first accumulation."""
        grad = self.grads[name]
        if self._overwrite_grads:
            self.xp.matmul(a, b, out=grad)
        else:
            grad += a @ b

    def _grads_done(self) -> None:
        self._overwrite_grads = False

    # --- batches of groups ------------------------------------------------------------

    def set_groups(
        self,
        bounds: Sequence[int] | None,
        grads: list[dict[str, Any]] | None = None,
        trees: Sequence[GroupTree] | None = None,
    ) -> None:
        """Run the next forward and backward on a batch of groups: samples
        ``bounds[i]:bounds[i + 1]`` are group ``i``, whose parameter gradients the
        backward writes (not adds) into ``grads[i]``. With ``trees``, ``grads[i]``
        receives instead the sum of the gradients of the groups of ``trees[i]``, added
        along that tree (see :meth:`_tree_sum`). ``None``: one batch, as usual."""
        self._groups = None if bounds is None else tuple(bounds)
        self._group_grads = [] if grads is None else grads
        if trees is None:
            trees = range(0 if bounds is None else len(bounds) - 1)
        self._group_trees = list(trees)

    def _group_sums(self, of: Any) -> Any:
        """A :meth:`_tree_sum` leaf: the column sums of a group's rows of ``of`` (2-D),
        as a backward of that group alone takes them (``of.sum(axis=0)``)."""
        rows = self._group_rows(len(of))

        def leaf(group: int, out: Any) -> None:
            lo, hi = rows[group]
            out[...] = of[lo:hi].sum(axis=0)

        return leaf

    def share_tree_scratch(self, arrays: dict[tuple[Any, ...], Any]) -> None:
        """Keep :meth:`_tree_sum`'s partial sums in ``arrays``, shared with other layers
        whose backward never runs at the same time as this one's: layers of one shape
        then hold one set of partial sums between them, not one each."""
        self._tree_scratch = arrays

    def _tree_sum(self, tree: GroupTree, leaf: Any, out: Any, depth: int = 0) -> Any:
        """``out`` = the sum over the groups of ``tree`` of what ``leaf(group, dest)``
        writes into ``dest``, each pair of subtrees added as ``left + right``: the
        numbers an all-reduce gets adding those groups' gradients along the same tree.
        The left subtree's sum goes to ``out`` itself, the right one's to a scratch array
        (one per depth, kept from step to step): few arrays, so more of them stay in
        cache."""
        if isinstance(tree, int):
            leaf(tree, out)
            return out
        key = (out.shape, out.dtype.str, depth)
        scratch = self._tree_scratch.get(key)
        if scratch is None:
            scratch = self._tree_scratch[key] = self.xp.empty(out.shape, out.dtype)
        self._tree_sum(tree[0], leaf, out, depth + 1)
        self._tree_sum(tree[1], leaf, scratch, depth + 1)
        return self.xp.add(out, scratch, out=out)

    def _group_rows(self, rows: int) -> list[tuple[int, int]]:
        """Each group's rows of a ``(rows, features)`` view of the batch."""
        assert self._groups is not None
        per_sample = rows // self._groups[-1]
        bounds = self._groups
        return [(lo * per_sample, hi * per_sample) for lo, hi in pairwise(bounds)]

    def _grouped_matmul(self, a: Any, b: Any) -> Any:
        """``a @ b`` on the rows of the batch: under :meth:`set_groups`, each group's
        rows are exactly those of its own product.

        One product of the whole batch is faster, and gives the same rows where the
        BLAS runs the same kernel, in the same order, whatever the number of rows.
        Whether it does, for these shapes and group sizes, is checked once: on this
        batch, and on random ones where it holds few numbers (see
        :func:`_random_products_agree`). Where it does not (a single row takes a
        matrix-vector kernel, a thin output a small-matrix one), the groups go one by one.
        """
        xp = self.xp
        if self._groups is None:
            return a @ b
        spans = self._group_rows(a.shape[0])
        if not a.flags.c_contiguous:  # the check tries contiguous rows
            return _group_products(xp, a, b, spans)
        key = (a.shape, a.strides, b.shape, b.strides, tuple(hi - lo for lo, hi in spans))
        agree = self._rows_agree.get(key)
        if agree:
            return a @ b
        parts = _group_products(xp, a, b, spans)
        if agree is None:
            self._rows_agree[key] = bool(
                xp.array_equal(a @ b, parts, equal_nan=True)
            ) and _random_products_agree(xp, a, b, spans)
        return parts

    def describe(self) -> str:
        fields = self.spec.model_dump(exclude={"type"})
        inner = ", ".join(f"{k}={v}" for k, v in fields.items() if v is not None)
        return f"{self.type}({inner})"


#: What a check that one product gives every group's rows compares, at least: numbers
#: and rows of each group (the batch itself, then random ones). A product that sums in
#: another order gives other bits for a good share of its numbers, not for all of them,
#: and a kernel for the last rows or columns may touch only those.
_AGREE_MIN_NUMBERS, _AGREE_MIN_ROWS = 4096, 64
_AGREE_MAX_DRAWS = 256


def _group_products(xp: ModuleType, a: Any, b: Any, spans: list[tuple[int, int]]) -> Any:
    """``a @ b``, the rows of each span a product of their own."""
    out = xp.empty((a.shape[0], b.shape[1]), dtype=a.dtype)
    for lo, hi in spans:
        xp.matmul(a[lo:hi], b, out=out[lo:hi])
    return out


def _random_products_agree(xp: ModuleType, a: Any, b: Any, spans: list[tuple[int, int]]) -> bool:
    """Whether one product gives, bit for bit, the rows of the products span by span on
    random ``a``s (the same shape, contiguous as ``a`` is, with the real ``b``): as many
    as it takes, with the batch already compared, to see enough numbers and rows of
    every span."""
    rows = min(hi - lo for lo, hi in spans)
    draws = max(
        -(-_AGREE_MIN_NUMBERS // max(rows * b.shape[1], 1)), -(-_AGREE_MIN_ROWS // max(rows, 1))
    )
    rng = np.random.default_rng(0)
    for _ in range(min(draws, _AGREE_MAX_DRAWS) - 1):
        trial = xp.asarray(rng.standard_normal(a.shape, dtype=np.float32).astype(a.dtype))
        if not bool(xp.array_equal(trial @ b, _group_products(xp, trial, b, spans))):
            return False
    return True


def fan_in_out(shape: Shape) -> tuple[int, int]:
    """Fans of a dense ``(in, out)`` or conv ``(out_ch, in_ch, kh, kw)`` weight."""
    if len(shape) == 2:
        return shape[0], shape[1]
    receptive = math.prod(shape[2:])
    return shape[1] * receptive, shape[0] * receptive


def init_weight(shape: Shape, rng: np.random.Generator, *, he: bool) -> np.ndarray:
    """He-normal (fan in) ahead of a ReLU, Xavier-uniform otherwise."""
    fan_in, fan_out = fan_in_out(shape)
    if he:
        return rng.normal(0.0, math.sqrt(2.0 / fan_in), size=shape)
    limit = math.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-limit, limit, size=shape)


#: Per-channel work runs on rows of about this many numbers (see :func:`side_by_side`).
WIDE_ROW = 512


def side_by_side(rows: int, channels: int) -> int:
    """How many of ``rows`` rows of ``channels`` numbers to lay side by side, as one row:
    the largest divisor of ``rows`` that keeps the row within ``WIDE_ROW`` numbers (at
    least 1). NumPy sums a column and broadcasts a row over an array one row at a time,
    so on a narrow array (a few channels) each step does little work."""
    most = max(WIDE_ROW // channels, 1)
    return max(d for d in range(1, most + 1) if rows % d == 0)


def mean_of_rows(x: Any) -> Any:
    """``x`` (N, R, C) -> the mean of each sample's R rows, (N, C); summed with rows
    laid side by side (see :func:`side_by_side`)."""
    n, rows, c = x.shape
    k = side_by_side(rows, c)
    sums = x.reshape(n, rows // k, k * c).sum(axis=1).reshape(n, k, c).sum(axis=1)
    return sums / rows


def spread_over_rows(xp: Any, dy: Any, rows: int) -> Any:
    """The gradient of :func:`mean_of_rows`: ``dy`` (N, C) / R in each of R rows, (N, R, C)."""
    n, c = dy.shape
    k = side_by_side(rows, c)
    dx = xp.empty((n, rows, c), dtype=dy.dtype)
    dx.reshape(n, rows // k, k * c)[...] = xp.tile(dy * (1.0 / rows), k)[:, None, :]
    return dx


def is_image(shape: Shape) -> bool:
    """Per-sample ``(C, H, W)``: travels channels-last inside the engine."""
    return len(shape) == 3
