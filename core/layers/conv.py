"""Convolution and pooling on channels-last batches.

Inside the engine an image batch is ``(N, H, W, C)``.

A convolution is one matrix product per pass, laid out so that neither its
input nor its output is ever transposed. Plain im2col gathers, for every output
pixel, its ``KH x KW x C`` window: when ``C`` is small (the first layers of a
CNN) that copies short runs of memory and makes the gathered matrix ``KH*KW``
times larger than the image. Here each GEMM row covers a *strip* of ``t``
neighbouring output pixels of one output row: it gathers the ``KH`` input row
segments under the strip, each ``(t - 1) * stride + KW`` pixels wide, and so
contiguous (``C`` channels per pixel). The weights become a banded matrix
``(KH * width * C, t * F)`` (zeros off the band), and the product is already
the channels-last output ``(N, OH, OW, F)``. ``t = 1`` is im2col; a wider strip
gathers less and copies longer runs, at the price of multiplying by the band's
zeros. :func:`_strip_costs` picks ``t`` per layer from a small cost model (a
deterministic choice, so results never depend on timing). The bias is one more
row of the band, against a column of ones in the strips. With NumPy the batch goes
through a few images at a time (``_PIECE_BYTES`` of strips): each piece is multiplied
while still in cache from its gathering.

Backward: ``[dW; db]`` is ``strips.T @ dy``, read along the band. ``dx`` is
``dy @ band.T`` (with strips of their own width, cheaper to add back) added back
where each strip was read: per group of strips that do not overlap and per
kernel row, one block copy into a zeroed plane and one add of whole image rows;
or, with a stride or long runs, added straight into place. Either way a few images
go at a time, while their strip gradients are in cache. With stride 1, ``dx`` is also the
convolution of ``dy`` (padded by ``KH - 1 - padding``) with the kernel flipped and its
channels and filters swapped: a forward pass of strips, with no adds; the cost model
picks whichever costs less.

Work arrays are kept per batch shape and reused across steps (:class:`Workspace`),
and short runs are copied as blocks (:func:`_runs`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from core.layers.base import (
    Layer,
    Shape,
    ShapeError,
    init_weight,
    is_image,
    mean_of_rows,
    spread_over_rows,
)
from core.spec import Conv2dSpec


def _out_size(size: int, kernel: int, stride: int) -> int:
    return (size - kernel) // stride + 1


def _need_image(layer: str, input_shape: Shape, field: str) -> None:
    if not is_image(input_shape):
        raise ShapeError(
            f"{layer} needs an image input (channels, height, width), got {input_shape}", field
        )


def _as_strided(xp: Any, x: Any, shape: tuple[int, ...], strides: tuple[int, ...]) -> Any:
    return xp.lib.stride_tricks.as_strided(x, shape=shape, strides=strides)


def _runs(
    xp: Any, array: Any, offset: int, shape: tuple[int, ...], strides: tuple[int, ...], run: int
) -> Any:
    """Blocks of ``run`` consecutive elements of the C-contiguous ``array``: block ``idx``
    starts at element ``offset + sum(idx * strides)``.

    With NumPy a block is one element of a void dtype, so that copying blocks moves
    ``run * itemsize`` bytes at a time instead of looping over short runs of numbers
    (about twice as fast for the runs here); otherwise a strided view whose last axis
    is the run.
    """
    if xp is not np:
        return _strided_runs(xp, array, offset, shape, strides, run)
    item = array.itemsize
    byte_strides = tuple(st * item for st in strides)
    block = np.dtype((np.void, run * item))
    return np.ndarray(shape, block, buffer=array, offset=offset * item, strides=byte_strides)


def _strided_runs(
    xp: Any, array: Any, offset: int, shape: tuple[int, ...], strides: tuple[int, ...], run: int
) -> Any:
    """The blocks of :func:`_runs` as numbers: a strided view whose last axis is the run."""
    item = array.itemsize
    byte_strides = tuple(st * item for st in strides)
    return _as_strided(xp, array.reshape(-1)[offset:], (*shape, run), (*byte_strides, item))


def _references(items: list[Any]) -> list[int]:
    """Reference counts of ``items``, as seen from here."""
    return [sys.getrefcount(item) for item in items]


#: The count of an object that only a list refers to (measured, as interpreters differ).
_UNSHARED = _references([object()])[0]


class Workspace:
    """Arrays a layer reuses from step to step, per shape and dtype.

    ``scratch`` arrays never leave the layer. ``output`` arrays are handed out (a
    layer's ``y`` or ``dx``) and are only reused once nothing outside the workspace
    refers to them any more (CPython reference counts; views count, as they hold
    their base), so a caller that keeps an output never sees it change. In a
    training loop the previous step's arrays are free again, and big arrays stop
    being allocated (for NumPy that means fresh pages from the OS, zeroed on
    first touch, every step). A layer drops its own reference to its last output
    before asking for the next one. With CuPy, whose memory pool already recycles
    device memory, outputs are simply allocated.
    """

    def __init__(self) -> None:
        self._arrays: dict[tuple[Any, ...], Any] = {}
        self._batch: int | None = None

    def batch(self, n: int) -> None:
        """Start work on a batch of ``n`` samples: arrays kept for another batch size
        (an evaluation pass, the last short batch of an epoch) are let go, so that
        memory holds one set of arrays, not one per batch size ever seen."""
        if n != self._batch:
            self._arrays.clear()
            self._batch = n

    def scratch(self, xp: Any, name: str, shape: tuple[int, ...], dtype: Any, zero: bool = False):
        key = (name, shape, np.dtype(dtype).str)
        array = self._arrays.get(key)
        if array is None:
            array = xp.zeros(shape, dtype=dtype) if zero else xp.empty(shape, dtype=dtype)
            self._arrays[key] = array
        return array

    def output(self, xp: Any, name: str, shape: tuple[int, ...], dtype: Any):
        if xp is not np:
            return xp.empty(shape, dtype=dtype)
        key = ("output", name, shape, np.dtype(dtype).str)
        ring = self._arrays.get(key)
        if ring is None:
            ring = self._arrays[key] = []
        for array, refs in zip(ring, _references(ring), strict=True):
            if refs <= _UNSHARED:
                return array
        array = np.empty(shape, dtype=dtype)
        if len(ring) < 2:
            ring.append(array)
        return array

    def memo(self, key: tuple[Any, ...], make: Any) -> Any:
        """A value derived from workspace arrays (a strided view), made once."""
        value = self._arrays.get(key)
        if value is None:
            value = self._arrays[key] = make()
        return value


# --- convolution ------------------------------------------------------------------------

# Cost model of a convolution's passes, per sample, in seconds (fitted on 2-core AMD
# EPYCs with OpenBLAS): GEMM flops; elements and runs copied by the gathers and
# scatters; elements added by the strided adds of the input gradient.
#
# A product's speed depends most on its narrow side, n = strip width x filters (the
# forward's and dW's output width, dx's inner dimension): about peak * n / (n + n0),
# as (peak FLOP/s, n0) per product.
_GEMM_RATES = {"forward": (540e9, 40), "dW": (380e9, 40), "dx": (460e9, 12)}
_COPY_S = 0.1e-9
_RUN_S = 2e-9
_ADD_S = 0.2e-9
#: dx adds its strip gradients straight into place (not through zeroed planes) with a
#: stride above 1 or runs (strip width x channels) at least this long.
_DIRECT_RUN = 128
#: Bytes worked through at a time, with NumPy, of a convolution's strips (forward) or
#: strip gradients (dx's direct adds), and of 2x2 max pooling's input: a piece of the
#: batch is gathered and multiplied, multiplied and added back, or pooled in a dozen
#: passes, while it is still in cache. (Pieces of 256 KiB made LeNet's step slower than
#: 1 MiB on a 2-core Zen 4 EPYC: the pooling's calls per piece then cost more.)
_PIECE_BYTES = 1 << 20
#: A network's first convolution gathers its strips, with NumPy, into one of two buffers in
#: turn from one training step to the next, when they hold at most this many bytes. Its
#: backward runs last and takes the step's last product, so the other BLAS threads, which
#: read part of the strips for dW, still hold them in their caches when the next step
#: gathers into the same buffer again: writing there then first takes the lines back from
#: those caches. (Two buffers made the first convolution's forward 1.3-1.4 ms -> 0.95 ms in
#: LeNet's and the 3x3 CNN's steps on a 2-core Zen 4 EPYC, the same numbers.) Larger strips
#: outgrow the caches anyway.
_TURNS_MAX_BYTES = 32 << 20


def _pieces(xp: Any, n: int, image_bytes: int) -> list[tuple[int, int]]:
    """Images ``lo:hi`` of a batch of ``n``, in pieces of as many images as ``_PIECE_BYTES``
    hold at ``image_bytes`` an image (with NumPy; one piece with other modules). They
    depend on the layer and the batch size alone, so results that depend on them (a
    product's bits on its number of rows) do not depend on where the layer runs."""
    images = n
    if xp is np:
        images = max(1, min(n, _PIECE_BYTES // image_bytes))
    return [(lo, min(n, lo + images)) for lo in range(0, n, images)]


def _strips(c: int, k: int, s: int, oh: int, ow: int, t: int) -> tuple[int, int, int]:
    """(GEMM rows per sample, band rows, strips that overlap) for strips of ``t`` pixels."""
    width = (t - 1) * s + k
    return oh * (ow // t), k * width * c, -(-width // (t * s))


def _strip_costs(
    c: int, f: int, k: int, s: int, w_pad: int, oh: int, ow: int
) -> dict[str, tuple[float, int]]:
    """Per pass, the least modelled cost per sample and its strip width (a divisor of
    ``ow``): "forward" (the forward product and dW: a gather, two GEMMs), "dx" (a GEMM, a
    scatter and the adds) and "product" (a gather and the forward GEMM alone)."""
    best = {name: (float("inf"), 1) for name in ("forward", "dx", "product")}
    for t in range(1, ow + 1):
        if ow % t:
            continue
        rows, cols, groups = _strips(c, k, s, oh, ow, t)
        flops, n = 2.0 * rows * cols * t * f, t * f
        gemm = {key: flops * (n + n0) / (peak * n) for key, (peak, n0) in _GEMM_RATES.items()}
        copy = rows * cols * _COPY_S + rows * k * _RUN_S
        adds = k * groups * oh * w_pad * c * _ADD_S
        for name, cost in (
            ("forward", gemm["forward"] + gemm["dW"] + copy),
            ("dx", gemm["dx"] + copy + adds),
            ("product", gemm["forward"] + copy),
        ):
            if cost < best[name][0] * 0.999:
                best[name] = (cost, t)
    return best


class Conv2d(Layer):
    """2-D convolution (cross-correlation, as in PyTorch).

    x: (N, H, W, C) -> y: (N, OH, OW, F); W: (F, C, KH, KW) as in PyTorch, b: (F,).
    y[n, oh, ow] = sum over the window of x_pad * W + b, computed as
    ``[strips, 1] @ [band; b]`` (see the module docstring): the bias is one more
    column of ones in the strips and one more row of the band, so the product
    adds it, and ``strips.T @ dy`` sums ``db`` with ``dW``.
    """

    type = "conv2d"
    has_weights = True

    def __init__(self, spec: Any) -> None:
        super().__init__(spec)
        self._buffers = Workspace()
        #: Output pixels per GEMM row of the forward product and dW, and of dx: divisors
        #: of the output width, chosen by ``infer``; tests and benchmarks may set others.
        self.strip = 1
        self.strip_dx = 1
        #: With stride 1, whether dx is taken as the convolution of dy with the flipped
        #: kernel (:meth:`flipped_conv`) instead of through strip gradients; also by cost.
        self.dx_as_conv = False
        self._flipped: Conv2d | None = None
        self._flipped_strip = 1
        self._turn = 0  # which strips buffer the first layer gathers into (_TURNS_MAX_BYTES)

    def _infer(self, input_shape: Shape) -> Shape:
        _need_image("conv2d", input_shape, "kernel_size")
        c, h, w = input_shape
        k, p, s = self.spec.kernel_size, self.spec.padding, self.spec.stride
        if k > h + 2 * p or k > w + 2 * p:
            raise ShapeError(
                f"kernel_size {k} is larger than the padded input {h + 2 * p}x{w + 2 * p}",
                "kernel_size",
            )
        if p >= k:
            raise ShapeError(f"padding {p} must be smaller than kernel_size {k}", "padding")
        oh, ow = _out_size(h + 2 * p, k, s), _out_size(w + 2 * p, k, s)
        self._geometry = (c, h, w, oh, ow)
        f = self.spec.filters
        best = _strip_costs(c, f, k, s, w + 2 * p, oh, ow)
        self.strip, self.strip_dx = best["forward"][1], best["dx"][1]
        self.dx_as_conv, self._flipped = False, None
        if s == 1:  # dx is also dy convolved with the flipped kernel: the cheaper way
            cost, t = _strip_costs(f, c, k, 1, ow + 2 * (k - 1 - p), h, w)["product"]
            self.dx_as_conv, self._flipped_strip = cost < best["dx"][0], t
        return (f, oh, ow)

    def flipped_conv(self) -> Conv2d:
        """dx as a convolution (stride 1): the layer that convolves dy, padded by ``k - 1 -
        p``, with this layer's kernel flipped and its channels and filters swapped, into
        the input's shape. Its strip width is the cost model's for that product alone."""
        if self._flipped is None:
            c, h, w, oh, ow = self._geometry
            k, p, f = self.spec.kernel_size, self.spec.padding, self.spec.filters
            spec = Conv2dSpec(type="conv2d", filters=c, kernel_size=k, padding=k - 1 - p)
            flipped = Conv2d(spec)
            flipped.infer((f, oh, ow))
            flipped.strip = self._flipped_strip
            flipped.xp, flipped.dtype = self.xp, self.dtype
            flipped.params["b"] = self.xp.zeros(c, dtype=self.dtype)
            self._flipped = flipped
        return self._flipped

    def param_shapes(self) -> dict[str, Shape]:
        k = self.spec.kernel_size
        return {"W": (self.spec.filters, self.input_shape[0], k, k), "b": (self.spec.filters,)}

    def flops(self) -> int:
        c, _, _, oh, ow = self._geometry
        k, f = self.spec.kernel_size, self.spec.filters
        return oh * ow * f * (2 * c * k * k + 1)

    def _initial_value(self, name: str, shape: Shape, rng: np.random.Generator, *, he: bool):
        return init_weight(shape, rng, he=he) if name == "W" else np.zeros(shape)

    # --- layout ---------------------------------------------------------------------------

    def _tiling(self, t: int) -> tuple[int, int, int]:
        """(strips per output row, input pixels under a strip, band rows without bias)."""
        c, _, _, _, ow = self._geometry
        if t < 1 or ow % t:
            raise ValueError(f"strip width {t} must divide the output width {ow}")
        width = (t - 1) * self.spec.stride + self.spec.kernel_size
        return ow // t, width, self.spec.kernel_size * width * c

    def _band_view(self, matrix: Any, t: int) -> Any:
        """The band entries of a ``(KH * width * C [+ 1], t * F)`` matrix, as ``(KH, KW, C, t, F)``.

        Entry ``[i, j, c, u, f]`` is row ``(i, u * stride + j, c)``, column ``(u, f)``:
        the weight ``W[f, c, i, j]`` as seen by output pixel ``u`` of the strip.
        """
        c = self._geometry[0]
        k, s, f = self.spec.kernel_size, self.spec.stride, self.spec.filters
        _, width, _ = self._tiling(t)
        cols = t * f
        item = matrix.itemsize
        strides = (width * c * cols, c * cols, cols, s * c * cols + f, 1)
        return _as_strided(self.xp, matrix, (k, k, c, t, f), tuple(item * st for st in strides))

    def _band(self, t: int, dtype: Any, bias: bool) -> Any:
        """The weights as the banded matrix ``(KH * width * C, t * F)``, with the bias as one
        more row if asked."""
        xp = self.xp
        f = self.spec.filters
        _, _, rows = self._tiling(t)
        name = f"band{t}" + ("b" if bias else "")
        band = self._buffers.scratch(xp, name, (rows + bias, t * f), dtype, zero=True)
        view = self._buffers.memo((name, band.dtype.str), lambda: self._band_view(band, t))
        # W (F, C, KH, KW) -> (KH, KW, C, 1, F), repeated along the strip.
        view[...] = self.params["W"].transpose(2, 3, 1, 0)[:, :, :, None, :]
        if bias:
            band[rows].reshape(t, f)[...] = self.params["b"]
        return band

    def _strips_buffer(self, n: int, dtype: Any, turn: int) -> tuple[Any, Any]:
        """The GEMM's left matrix ``(N * OH * strips, KH * width * C + 1)``, last column ones,
        and its gathered part as blocks ``(N, OH, strips, KH)`` of ``width * C``; buffer
        ``turn`` (0 or 1) of two."""
        xp = self.xp
        c, _, _, oh, _ = self._geometry
        t = self.strip
        tiles, width, rows = self._tiling(t)
        shape = (n * oh * tiles, rows + 1)
        key = ("strips", shape, np.dtype(dtype).str, turn)

        def make() -> tuple[Any, Any]:
            strips = self._buffers.scratch(xp, f"strips{turn}", shape, dtype)
            strips[:, rows] = 1
            cols = rows + 1
            strides = (oh * tiles * cols, tiles * cols, cols, width * c)
            blocks = (n, oh, tiles, self.spec.kernel_size)
            return strips, _runs(xp, strips, 0, blocks, strides, width * c)

        return self._buffers.memo(key, make)

    def _strips_of(self, source: Any) -> Any:
        """The input blocks under each strip, ``(N, OH, strips, KH)`` of ``width * C``,
        from the (padded) input."""
        xp = self.xp
        if not source.flags.c_contiguous:
            source = xp.ascontiguousarray(source)
        n, hp, wp, c = source.shape
        oh = self._geometry[3]
        k, s, t = self.spec.kernel_size, self.spec.stride, self.strip
        tiles, width, _ = self._tiling(t)
        strides = (hp * wp * c, s * wp * c, t * s * c, wp * c)
        return _runs(xp, source, 0, (n, oh, tiles, k), strides, width * c)

    # --- passes ---------------------------------------------------------------------------

    def forward(self, x: Any, training: bool) -> Any:
        xp = self.xp
        n = x.shape[0]
        c, h, w, oh, ow = self._geometry
        p, f, t = self.spec.padding, self.spec.filters, self.strip
        tiles, _, rows = self._tiling(t)
        self._buffers.batch(n)
        per_image = oh * tiles
        image_bytes = per_image * (rows + 1) * x.itemsize  # of strips
        if (
            training
            and not self.needs_input_grad
            and xp is np
            and n * image_bytes <= _TURNS_MAX_BYTES
        ):
            self._turn ^= 1
        strips, gathered = self._strips_buffer(n, x.dtype, self._turn)
        if p:
            hp, wp = h + 2 * p, w + 2 * p
            padded = self._buffers.scratch(xp, "padded", (n, hp, wp, c), x.dtype, zero=True)
            # the padded buffer is ours, so its blocks can be kept
            key = ("padded_blocks", padded.shape, t, padded.dtype.str)
            blocks = self._buffers.memo(key, lambda: self._strips_of(padded))
        else:
            blocks = self._strips_of(x)
        band = self._band(t, x.dtype, bias=True)
        y = self._buffers.output(xp, "y", (n, oh, ow, f), x.dtype)
        y_rows = y.reshape(n * oh * tiles, t * f)  # channels-last
        # A piece of the batch at a time: its strips are multiplied while still in cache
        # from their gathering (all of them stay, for dW).
        for lo, hi in _pieces(xp, n, image_bytes):
            if p:
                padded[lo:hi, p : p + h, p : p + w, :] = x[lo:hi]  # the border stays zero
            gathered[lo:hi] = blocks[lo:hi]
            gemm_rows = slice(lo * per_image, hi * per_image)
            xp.matmul(strips[gemm_rows], band, out=y_rows[gemm_rows])
        self._strips, self._band_t = strips, t
        return y

    def backward(self, dy: Any) -> Any:
        xp = self.xp
        c, h, w, oh, _ = self._geometry
        p, s, f = self.spec.padding, self.spec.stride, self.spec.filters
        t = self._band_t
        tiles, _, rows = self._tiling(t)
        n = dy.shape[0]
        self._buffers.batch(n)
        # [dW; db]: strips.T @ dy holds every (window offset, channel, filter) on the band,
        # and the column sums of dy in its last row.
        grad_band = self._buffers.scratch(xp, f"grad_band{t}", (rows + 1, t * f), dy.dtype)
        xp.matmul(self._strips.T, dy.reshape(n * oh * tiles, t * f), out=grad_band)
        grad_view = self._buffers.memo(
            ("grad_band_view", t, grad_band.dtype.str), lambda: self._band_view(grad_band, t)
        )
        dw = grad_view.sum(axis=3)  # (KH, KW, C, F)
        self._accumulate("W", dw.transpose(3, 2, 0, 1))
        self._accumulate("b", grad_band[rows].reshape(t, f).sum(axis=0))
        self._grads_done()
        if not self.needs_input_grad:
            return None
        if self.dx_as_conv:
            flipped = self.flipped_conv()
            flipped.params["W"] = self.params["W"].transpose(1, 0, 2, 3)[:, :, ::-1, ::-1]
            return flipped.forward(dy, False)
        # dx: each strip's gradient (dy @ band.T, strips of their own width), added back
        # where the strip was read. Strips of one group do not overlap: for each group and
        # kernel row, one copy places the pieces in a zeroed plane (the same places every
        # time, so the rest stays zero), and one add shifts the plane down by the kernel
        # row, whole image rows at a time.
        t = self.strip_dx
        tiles, width, rows = self._tiling(t)
        band = self._band(t, dy.dtype, bias=False)
        dy2 = dy.reshape(n * oh * tiles, t * f)
        hp, wp = h + 2 * p, w + 2 * p
        if s > 1 or width * c >= _DIRECT_RUN:
            # Strided planes would be added every other image row, and long runs add as
            # fast straight from the strip gradients: each piece adds into dx directly,
            # a few images at a time, while their strip gradients are in cache.
            dx = self._buffers.scratch(xp, "dx_padded", (n, hp, wp, c), dy.dtype)
            dx[...] = 0
            for gemm_rows, dstrips, adds in self._strip_adds(n, t, dy.dtype):
                xp.matmul(dy2[gemm_rows], band.T, out=dstrips)
                for target, source in adds:
                    target += source
        else:
            dstrips = self._buffers.scratch(xp, f"dstrips{t}", (n * oh * tiles, rows), dy.dtype)
            if p:
                dx = self._buffers.scratch(xp, "dx_padded", (n, hp, wp, c), dy.dtype)
            else:
                dx = self._buffers.output(xp, "dx", (n, hp, wp, c), dy.dtype)
            planes = self._planes(n, t, dy.dtype)
            per_image = oh * tiles
            # a few images at a time, while their strip gradients are in cache
            for lo, hi in _pieces(xp, n, per_image * rows * dy.itemsize):
                gemm_rows = slice(lo * per_image, hi * per_image)
                xp.matmul(dy2[gemm_rows], band.T, out=dstrips[gemm_rows])
                first = True
                for plane, copies in planes:
                    for i, (target, source) in enumerate(copies):
                        target[lo:hi] = source[lo:hi]
                        if first:  # the first copy starts the sum
                            dx[lo:hi, :oh] = plane[lo:hi]
                            dx[lo:hi, oh:] = 0
                            first = False
                        else:
                            dx[lo:hi, i : i + oh] += plane[lo:hi]
            if not p:
                return dx
        out = self._buffers.output(xp, "dx", (n, h, w, c), dy.dtype)
        out[...] = dx[:, p : p + h, p : p + w, :]
        return out

    def _strip_groups(self, t: int, images: int) -> list[_StripGroup]:
        """The groups of strips of width ``t`` that do not overlap, over ``images`` images
        of strip gradients (``(images * OH * strips, band rows)``)."""
        c, _, _, oh, _ = self._geometry
        k, s = self.spec.kernel_size, self.spec.stride
        tiles, width, rows = self._tiling(t)
        groups = -(-width // (t * s))
        run = width * c
        return [
            _StripGroup(
                shape=(images, oh, len(range(g, tiles, groups))),
                column=g * t * s * c,
                step=groups * t * s * c,
                run=run,
                sources=[g * rows + i * run for i in range(k)],
                source_strides=(oh * tiles * rows, tiles * rows, groups * rows),
            )
            for g in range(min(groups, tiles))
        ]

    def _strip_adds(self, n: int, t: int, dtype: Any) -> list[tuple[slice, Any, list[Any]]]:
        """dx's direct adds, a piece of the batch at a time: per piece, its rows of the
        dx product, the strip gradients' array they go to, and per group of
        non-overlapping strips and kernel row (the places in the padded dx, the strip
        gradients' pieces), as (images, OH, strips, run) views of numbers.

        The pieces are :func:`_pieces` of the strip gradients."""
        xp = self.xp
        c, h, w, oh, _ = self._geometry
        p, s = self.spec.padding, self.spec.stride
        tiles, _, rows = self._tiling(t)
        hp, wp = h + 2 * p, w + 2 * p
        per_image = oh * tiles
        pieces = _pieces(xp, n, per_image * rows * np.dtype(dtype).itemsize)
        images = pieces[0][1] - pieces[0][0] if pieces else 1
        key = ("strip_adds", n, t, images, np.dtype(dtype).str)

        def adds(dx: Any, dstrips: Any, m: int) -> list[Any]:
            out = []
            for group in self._strip_groups(t, m):
                places = (hp * wp * c, s * wp * c, group.step)
                for i, source in enumerate(group.sources):
                    out.append(
                        (
                            group.runs(xp, dx, i * wp * c + group.column, places, numbers=True),
                            group.runs(xp, dstrips, source, group.source_strides, numbers=True),
                        )
                    )
            return out

        def make() -> list[tuple[slice, Any, list[Any]]]:
            dx = self._buffers.scratch(xp, "dx_padded", (n, hp, wp, c), dtype)
            dstrips = self._buffers.scratch(xp, f"dstrips{t}", (images * per_image, rows), dtype)
            out = []
            for lo, hi in pieces:
                piece = dstrips[: (hi - lo) * per_image]
                gemm_rows = slice(lo * per_image, hi * per_image)
                out.append((gemm_rows, piece, adds(dx[lo:hi], piece, hi - lo)))
            return out

        return self._buffers.memo(key, make)

    def _planes(self, n: int, t: int, dtype: Any) -> list[tuple[Any, list[tuple[Any, Any]]]]:
        """Per group of non-overlapping strips: a zeroed plane (N, OH, W_pad, C), and per
        kernel row the (blocks of the plane, blocks of the strip gradients) to copy."""
        xp = self.xp
        c, _, w, oh, _ = self._geometry
        wp = w + 2 * self.spec.padding
        tiles, _, rows = self._tiling(t)
        key = ("planes", n, t, np.dtype(dtype).str)

        def make() -> list[tuple[Any, list[tuple[Any, Any]]]]:
            dstrips = self._buffers.scratch(xp, f"dstrips{t}", (n * oh * tiles, rows), dtype)
            out = []
            for g, group in enumerate(self._strip_groups(t, n)):
                plane = self._buffers.scratch(xp, f"plane{t}_{g}", (n, oh, wp, c), dtype, True)
                target = group.runs(xp, plane, group.column, (oh * wp * c, wp * c, group.step))
                pieces = [
                    (target, group.runs(xp, dstrips, source, group.source_strides))
                    for source in group.sources
                ]
                out.append((plane, pieces))
            return out

        return self._buffers.memo(key, make)


@dataclass(frozen=True)
class _StripGroup:
    """Strips ``g, g + groups, ...`` of every output row: strips that do not overlap,
    so that their gradients go back in one copy or add per kernel row."""

    shape: tuple[int, int, int]  # (images, OH, strips in the group)
    column: int  # where its first strip starts in a padded image row (numbers)
    step: int  # from one of its strips to the next (numbers)
    run: int  # a strip's width x channels
    sources: list[int]  # per kernel row, where its first piece lies in the strip gradients
    source_strides: tuple[int, int, int]  # (image, output row, strip) in the strip gradients

    def runs(
        self, xp: Any, array: Any, offset: int, strides: tuple[int, ...], numbers: bool = False
    ) -> Any:
        """The group's runs in ``array`` (see :func:`_runs`; as numbers if asked)."""
        view = _strided_runs if numbers else _runs
        return view(xp, array, offset, self.shape, strides, self.run)


# --- pooling ------------------------------------------------------------------------------


def _take_pixels(xp: Any, flat: Any, out: Any, row_step: int, pixel_step: int) -> None:
    """``out[i, j]`` (an ``(R, OW, C)`` array) = the ``C`` numbers of the 1-D ``flat`` from
    ``i * row_step + j * pixel_step`` on (steps in numbers)."""
    item, c = flat.itemsize, out.shape[2]
    if xp is np:  # each pixel's C numbers as one element: half the time
        pixel = np.dtype((np.void, c * item))
        source = _as_strided(
            xp, flat.view(pixel), out.shape[:2], (row_step * item, pixel_step * item)
        )
        out.reshape(-1, c).view(pixel).reshape(out.shape[:2])[...] = source
    else:
        out[...] = _as_strided(xp, flat, out.shape, (row_step * item, pixel_step * item, item))


class _Pool2d(Layer):
    """Shared geometry of max and average pooling (no padding, floor mode)."""

    def _infer(self, input_shape: Shape) -> Shape:
        _need_image(self.type, input_shape, "pool_size")
        c, h, w = input_shape
        k = self.spec.pool_size
        s = self.spec.stride or k
        if k > h or k > w:
            raise ShapeError(f"pool_size {k} is larger than the input {h}x{w}", "pool_size")
        self._geometry = (c, h, w, _out_size(h, k, s), _out_size(w, k, s), k, s)
        return (c, self._geometry[3], self._geometry[4])

    def flops(self) -> int:
        c, _, _, oh, ow, k, _ = self._geometry
        return c * oh * ow * k * k

    def _offsets(self, x: Any):
        """For each window offset ``(i, j)``: the strided view of x it reads, (N, OH, OW, C)."""
        _, _, _, oh, ow, k, s = self._geometry
        for i in range(k):
            for j in range(k):
                yield x[:, i : i + s * oh : s, j : j + s * ow : s, :]

    # Windows that tile the input (stride = pool size) work on whole image rows.

    @property
    def _covers_input(self) -> bool:
        """Whether tiling windows cover every input row and column (none left over)."""
        _, h, w, oh, ow, k, _ = self._geometry
        return h == k * oh and w == k * ow

    def _rows(self, x: Any) -> Any:
        """x as (N * OH, k, OW * k * C): the ``k`` input rows under each row of windows
        (rows and columns that no window covers left out)."""
        c, _, _, oh, ow, k, _ = self._geometry
        n = x.shape[0]
        if not self._covers_input:
            x = x[:, : k * oh, : k * ow, :]
        return self.xp.ascontiguousarray(x).reshape(n * oh, k, ow * k * c)

    def _along(self, dy: Any) -> Any:
        """Each window's ``dy`` at its ``k`` pixels of a row, (N * OH, 1, OW * k * C), to
        broadcast over the window's rows as laid out by :meth:`_rows`. With NumPy it is
        taken into a workspace array: a new one every step would be fresh pages."""
        xp = self.xp
        c, _, _, oh, ow, k, _ = self._geometry
        windows = dy.shape[0] * oh * ow
        rows = dy.reshape(windows, c)
        if xp is np:
            index = self._buffers.memo(
                ("along", windows, k), lambda: np.repeat(np.arange(windows), k)
            )
            spread = self._buffers.scratch(xp, "along", (windows * k, c), dy.dtype)
            np.take(rows, index, axis=0, out=spread, mode="clip")  # "raise" buffers out
        else:
            spread = xp.repeat(rows, k, axis=0)
        return spread.reshape(-1, 1, ow * k * c)


class MaxPool2d(_Pool2d):
    """Max over each window; the gradient goes to the first maximum, as in PyTorch.

    x: (N, H, W, C) -> y: (N, OH, OW, C). "First" is in row-major order of the window.

    The common 2x2, stride 2 case works on whole image rows: with ``top`` and
    ``bottom`` the two input rows under a row of windows, each ``(W * C)`` long, a
    window's left and right columns are ``C`` apart, so ``max(row[:-C], row[C:])``
    holds every window's row maximum at the window's left positions (and junk,
    never read, in between). Everything is contiguous but the final gather of the
    output and the spreading of ``dy`` over the windows.
    """

    type = "maxpool2d"

    def __init__(self, spec: Any) -> None:
        super().__init__(spec)
        self._buffers = Workspace()

    def _fast(self) -> bool:
        _, _, _, _, _, k, s = self._geometry
        return k == 2 and s == 2

    def forward(self, x: Any, training: bool) -> Any:
        if self._fast():
            return self._forward_2x2(x)
        xp = self.xp
        # Running maximum over the window offsets; a later offset wins only if strictly
        # greater, so ``index`` is the first maximum in row-major order.
        views = self._offsets(x)
        y = xp.array(next(views))
        kind = xp.uint8 if self._geometry[5] ** 2 <= 256 else xp.uint16
        index = xp.zeros(y.shape, dtype=kind)
        greater = xp.empty(y.shape, dtype=bool)
        for offset, view in enumerate(views, start=1):
            xp.greater(view, y, out=greater)
            xp.maximum(y, view, out=y)
            index += greater * kind(offset) - greater * index
        self._index, self._x_shape = index, x.shape
        return y

    def backward(self, dy: Any) -> Any:
        if self._fast():
            return self._backward_2x2(dy)
        xp = self.xp
        dx = xp.zeros(self._x_shape, dtype=dy.dtype)
        for offset, dview in enumerate(self._offsets(dx)):
            dview += dy * (self._index == offset)
        return dx

    # --- 2x2, stride 2 ------------------------------------------------------------------

    def _forward_2x2(self, x: Any) -> Any:
        """Every step is one contiguous pass over the flattened rows.

        In the flat array a window's four elements sit at ``p`` (top left),
        ``p + C`` (top right), ``p + L`` and ``p + L + C`` (bottom), with ``L``
        the length of an image row; ``max(flat[:-C], flat[C:])`` holds the row
        maximum of every window at its left positions, and so on. Results at the
        other positions are junk that no one reads; the ``valid`` pattern (the top
        left elements) clears it before masks are shifted into place. The mask of
        each window's first maximum (an exact copy of PyTorch's choice on ties) is
        kept for backward. A few images go at a time (:func:`_pieces`), so that the
        passes run in cache.
        """
        xp = self.xp
        c, _, _, oh, ow, _, _ = self._geometry
        n = x.shape[0]
        self._buffers.batch(n)
        flat = self._rows(x).reshape(-1)
        mask = self._buffers.scratch(xp, "mask", (flat.size,), bool)
        y = self._buffers.output(xp, "y", (n, oh, ow, c), x.dtype)
        windows = y.reshape(n * oh, ow, c)
        per_image = flat.size // n
        for lo, hi in _pieces(xp, n, per_image * x.itemsize):
            part = slice(lo * per_image, hi * per_image)
            self._max_2x2(flat[part], mask[part], windows[lo * oh : hi * oh])
        self._mask, self._x_shape = mask, x.shape
        return y

    def _max_2x2(self, flat: Any, mask: Any, y: Any) -> None:
        """The maximum of each window of the flat rows ``flat`` into ``y`` (R, OW, C),
        and the mask of the first maximums into ``mask``."""
        xp = self.xp
        r, _, c = y.shape
        size = flat.size
        length = size // (2 * r)
        n1, n2 = size - c, size - c - length
        get = self._buffers.scratch
        row_max = get(xp, "row_max", (n1,), flat.dtype)
        xp.maximum(flat[:-c], flat[c:], out=row_max)
        left = get(xp, "left", (n1,), bool)  # the left element wins its row (ties: left)
        xp.greater_equal(flat[:-c], flat[c:], out=left)
        peak = get(xp, "peak", (n2,), flat.dtype)
        xp.maximum(row_max[:-length], row_max[length:], out=peak)
        top = get(xp, "top", (n2,), bool)  # the top row holds the first maximum (ties: top)
        xp.greater_equal(row_max[:-length], row_max[length:], out=top)
        valid = self._buffers.memo(("valid", r, length, c), lambda: self._valid(r, length, c))
        # The row of each window that holds its first maximum, marked at that row's left
        # position (and nowhere else): the top row where ``top``, else the bottom row.
        row = get(xp, "row", (n1,), bool)
        xp.logical_and(top, valid, out=row[:n2])
        row[n2:] = False
        xp.logical_xor(row[:n2], valid, out=top)  # now: the bottom row, at the top position
        xp.logical_or(row[length:], top, out=row[length:])
        # The chosen element: the marked row's left element if it wins its row, else the
        # right one (C further).
        xp.logical_and(row, left, out=mask[:n1])
        mask[n1:] = False
        xp.logical_xor(row, mask[:n1], out=row)
        xp.logical_or(mask[c:], row, out=mask[c:])
        _take_pixels(xp, peak, y, 2 * length, 2 * c)

    def _valid(self, r: int, length: int, c: int) -> Any:
        """True at the top left element of every window, over ``r * 2 * length - c - length``."""
        pattern = np.zeros((r, 2, length // c, c), dtype=bool)
        pattern[:, 0, ::2, :] = True
        return self.xp.asarray(pattern.reshape(-1)[: r * 2 * length - c - length])

    def _backward_2x2(self, dy: Any) -> Any:
        xp = self.xp
        c, _, _, oh, ow, _, _ = self._geometry
        n = dy.shape[0]
        self._buffers.batch(n)
        length = 2 * ow * c
        dx = self._buffers.output(xp, "dx", self._x_shape, dy.dtype)
        mask = self._mask.reshape(n, oh, 2, length)
        whole = self._covers_input
        if not whole:
            dx[...] = 0
        for lo, hi in _pieces(xp, n, oh * 2 * length * dy.itemsize):
            # dy of each window at both elements of its rows, then times the mask
            # (broadcast over the two rows)
            along = self._along(dy[lo:hi])
            r = (hi - lo) * oh
            piece = mask[lo:hi].reshape(r, 2, length)
            if whole:
                xp.multiply(along, piece, out=dx[lo:hi].reshape(r, 2, length))
            else:
                dx[lo:hi, : 2 * oh, : 2 * ow, :] = (along * piece).reshape(
                    hi - lo, 2 * oh, 2 * ow, c
                )
        return dx


class AvgPool2d(_Pool2d):
    """Mean over each window. x: (N, H, W, C) -> y: (N, OH, OW, C); dx = dy / (k*k) per window.

    Windows that do not overlap (stride = pool size, the usual case) work on whole image
    rows: the ``k`` input rows under a row of windows are added as contiguous rows, and a
    window's ``k`` pixels, ``C`` apart in such a row, by ``k - 1`` shifted adds of the
    flat sums, whose every ``k``-th pixel is a window's sum. Backward repeats each
    window's ``dy / k^2`` over its pixels and rows. Overlapping windows add their strided
    views of x, one per window offset.
    """

    type = "avgpool2d"

    def __init__(self, spec: Any) -> None:
        super().__init__(spec)
        self._buffers = Workspace()

    def _tiled(self) -> bool:
        _, _, _, _, _, k, s = self._geometry
        return k == s > 1

    def forward(self, x: Any, training: bool) -> Any:
        self._x_shape = x.shape
        if self._tiled():
            return self._forward_tiled(x)
        xp = self.xp
        views = self._offsets(x)
        y = xp.array(next(views))
        for view in views:
            y += view
        y *= 1.0 / (self._geometry[5] ** 2)
        return y

    def backward(self, dy: Any) -> Any:
        if self._tiled():
            return self._backward_tiled(dy)
        dx = self.xp.zeros(self._x_shape, dtype=dy.dtype)
        share = dy * (1.0 / (self._geometry[5] ** 2))
        for dview in self._offsets(dx):
            dview += share
        return dx

    def _forward_tiled(self, x: Any) -> Any:
        xp = self.xp
        c, _, _, oh, ow, k, _ = self._geometry
        n = x.shape[0]
        self._buffers.batch(n)
        rows = self._rows(x)
        r, length = rows.shape[0], rows.shape[2]
        sums = self._buffers.scratch(xp, "sums", (r, length), x.dtype)
        xp.add(rows[:, 0], rows[:, 1], out=sums)
        for i in range(2, k):
            sums += rows[:, i]
        flat = sums.reshape(-1)
        size = flat.size - (k - 1) * c
        window = self._buffers.scratch(xp, "window", (size,), x.dtype)
        xp.add(flat[:size], flat[c : c + size], out=window)
        for j in range(2, k):
            window += flat[j * c : j * c + size]
        window *= 1.0 / (k * k)
        # every k-th pixel of the shifted sums is a window's mean
        y = self._buffers.output(xp, "y", (n, oh, ow, c), x.dtype)
        _take_pixels(xp, window, y.reshape(r, ow, c), length, k * c)
        return y

    def _backward_tiled(self, dy: Any) -> Any:
        xp = self.xp
        c, _, _, oh, ow, k, _ = self._geometry
        n = dy.shape[0]
        self._buffers.batch(n)
        r = n * oh
        share = self._buffers.scratch(xp, "share", dy.shape, dy.dtype)
        along = self._along(xp.multiply(dy, 1.0 / (k * k), out=share))
        dx = self._buffers.output(xp, "dx", self._x_shape, dy.dtype)
        if self._covers_input:
            dx.reshape(r, k, ow * k * c)[...] = along
            return dx
        dx[...] = 0
        dx[:, : k * oh, : k * ow, :] = xp.broadcast_to(along, (r, k, ow * k * c)).reshape(
            n, k * oh, k * ow, c
        )
        return dx


class GlobalAvgPool(Layer):
    """Mean over height and width. x: (N, H, W, C) -> y: (N, C)."""

    type = "global_avgpool"

    def _infer(self, input_shape: Shape) -> Shape:
        _need_image("global_avgpool", input_shape, "type")
        return (input_shape[0],)

    def forward(self, x: Any, training: bool) -> Any:
        n, h, w, c = self._x_shape = x.shape
        return mean_of_rows(x.reshape(n, h * w, c))

    def backward(self, dy: Any) -> Any:
        n, h, w, c = self._x_shape
        return spread_over_rows(self.xp, dy, h * w).reshape(self._x_shape)


class Flatten(Layer):
    """(N, ...) -> (N, features), in PyTorch's channels-first order for images."""

    type = "flatten"
    groupable = True

    def _infer(self, input_shape: Shape) -> Shape:
        return (int(np.prod(input_shape, dtype=np.int64)),)

    def flops(self) -> int:
        return 0

    def forward(self, x: Any, training: bool) -> Any:
        self._x_shape = x.shape
        if x.ndim == 4:  # (N, H, W, C) -> (N, C, H, W) order
            x = x.transpose(0, 3, 1, 2)
        return x.reshape(x.shape[0], -1)

    def backward(self, dy: Any) -> Any:
        if len(self._x_shape) == 4:
            n, h, w, c = self._x_shape
            return dy.reshape(n, c, h, w).transpose(0, 2, 3, 1)
        return dy.reshape(self._x_shape)
