"""A sequential model built from its JSON spec."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from core.backend import DTYPES, get_xp, to_numpy
from core.errors import SpecError
from core.layers import LAYERS, Layer, ShapeError
from core.layers.base import GroupTree, is_image
from core.losses import check_loss_fits
from core.spec import EmbeddingSpec, ModelSpec, parse_model_spec

Shape = tuple[int, ...]
_HE_ACTIVATIONS = ("relu", "leaky_relu")
#: Flat arrays whose gradient views a model keeps (the oldest go first).
_GRAD_VIEWS_KEPT = 64
_OTHER_ACTIVATIONS = ("tanh", "sigmoid", "gelu")


def _feeds_relu(layers: list[Layer], index: int) -> bool:
    """Whether the next activation after layer ``index``, before another weighted layer, is ReLU."""
    for later in layers[index + 1 :]:
        if later.type in _HE_ACTIVATIONS:
            return True
        if later.has_weights or later.type in _OTHER_ACTIVATIONS:
            return False
    return False


def _run_order(layers: list[Layer]) -> list[Layer]:
    """The layers in the order they run: as listed, except that a ReLU just before a
    max pooling runs after it instead, on a quarter of the numbers (for 2x2 windows).

    The two orders give the same numbers (a zero may change sign): the maximum of ReLUs
    is the ReLU of the maximum, and where a window's maximum is positive it is the
    same element either way, so the gradient goes to the same input; where it is
    not, the ReLU zeroes the gradient either way.
    """
    order = list(layers)
    for i in range(len(order) - 1):
        if order[i].type == "relu" and order[i + 1].type == "maxpool2d":
            order[i], order[i + 1] = order[i + 1], order[i]
    return order


@dataclass(frozen=True)
class LayerSummary:
    index: int
    type: str
    description: str
    output_shape: Shape
    params: int
    flops: int


@dataclass(frozen=True)
class ModelSummary:
    """What a spec builds: per layer output shape, parameters and forward FLOPs per sample."""

    input_shape: Shape
    layers: tuple[LayerSummary, ...]
    loss: str

    @property
    def params(self) -> int:
        return sum(layer.params for layer in self.layers)

    @property
    def flops(self) -> int:
        return sum(layer.flops for layer in self.layers)

    @property
    def output_shape(self) -> Shape:
        return self.layers[-1].output_shape

    def __str__(self) -> str:
        rows = [("#", "layer", "output", "params", "FLOPs")]
        rows.append(("", "input", str(self.input_shape), "", ""))
        for layer in self.layers:
            rows.append(
                (
                    str(layer.index),
                    layer.description,
                    str(layer.output_shape),
                    f"{layer.params:,}",
                    f"{layer.flops:,}",
                )
            )
        rows.append(("", f"loss: {self.loss}", "", f"{self.params:,}", f"{self.flops:,}"))
        widths = [max(len(row[i]) for row in rows) for i in range(5)]
        lines = [
            "  ".join(
                cell.ljust(w) if i < 3 else cell.rjust(w)
                for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            )
            for row in rows
        ]
        return "\n".join(lines)


def _infer_layers(
    spec: ModelSpec,
    input_shape: Shape,
    num_classes: int | None,
    label_shape: Shape | None = None,
    vocab_size: int | None = None,
) -> list[Layer]:
    layers: list[Layer] = []
    shape = tuple(int(d) for d in input_shape)
    for index, layer_spec in enumerate(spec.layers):
        layer = LAYERS[layer_spec.type](layer_spec)
        try:
            shape = layer.infer(shape)
        except ShapeError as exc:
            raise SpecError(
                exc.reason, layer=index, layer_type=layer_spec.type, field=exc.field
            ) from None
        if any(d <= 0 for d in shape):
            raise SpecError(
                f"output shape {shape} has an empty axis",
                layer=index,
                layer_type=layer_spec.type,
            )
        if index > 0 and getattr(layer, "takes_token_ids", False):
            raise SpecError(
                f"{layer_spec.type} takes token ids, so it must be the first layer",
                layer=index,
                layer_type=layer_spec.type,
                field="type",
            )
        if (
            vocab_size is not None
            and isinstance(layer_spec, EmbeddingSpec)
            and layer_spec.vocab_size < vocab_size
        ):
            raise SpecError(
                f"vocab_size {layer_spec.vocab_size} is smaller than the dataset's vocabulary "
                f"of {vocab_size} tokens (ids 0 to {vocab_size - 1}): it must be at least "
                f"{vocab_size}",
                layer=index,
                layer_type=layer_spec.type,
                field="vocab_size",
            )
        layers.append(layer)
    check_loss_fits(spec.loss, shape, num_classes, label_shape)
    return layers


def summarize(
    spec: ModelSpec | dict[str, Any],
    input_shape: Shape,
    num_classes: int | None = None,
    *,
    label_shape: Shape | None = None,
    vocab_size: int | None = None,
) -> ModelSummary:
    """Shapes, parameters and FLOPs of a spec, without allocating anything.

    What is known of the dataset is checked too: ``num_classes`` and ``label_shape``
    (one sample's targets, see :func:`core.losses.check_loss_fits`) against the loss,
    and ``vocab_size`` (how many token ids a text dataset's inputs use) against the
    embedding's.
    """
    model_spec = parse_model_spec(spec)
    layers = _infer_layers(model_spec, input_shape, num_classes, label_shape, vocab_size)
    return ModelSummary(
        input_shape=tuple(input_shape),
        layers=tuple(
            LayerSummary(
                index=i,
                type=layer.type,
                description=layer.describe(),
                output_shape=layer.output_shape,
                params=sum(math.prod(s) for s in layer.param_shapes().values()),
                flops=layer.flops(),
            )
            for i, layer in enumerate(layers)
        ),
        loss=model_spec.loss,
    )


class Model:
    """Layers run forward in order and backward in reverse.

    Inputs and outputs are channels-first as the datasets give them,
    ``x: (batch, *input_shape)``; image batches are turned channels-last once
    at the model's edges (free for one channel).
    """

    def __init__(
        self,
        spec: ModelSpec,
        layers: list[Layer],
        input_shape: Shape,
        *,
        dtype: Any,
        device: str,
        seed: int,
    ) -> None:
        self.spec = spec
        self.layers = layers
        self._run_order = _run_order(layers)
        # Backward runs one layer at a time, so layers can share their partial sums.
        tree_scratch: dict[tuple[Any, ...], Any] = {}
        for layer in layers:
            layer.share_tree_scratch(tree_scratch)
        self.input_shape = input_shape
        self.output_shape = layers[-1].output_shape
        self.dtype = np.dtype(dtype)
        self.device = device
        self.xp = get_xp(device)
        self.seed = seed
        self.set_rng(np.random.default_rng(seed))
        self._no_samples = False

    # --- running --------------------------------------------------------------

    def set_rng(self, rng: np.random.Generator) -> None:
        """The random source of dropout masks (the trainer sets one per step)."""
        self.rng = rng
        for layer in self.layers:
            layer.rng = rng

    @property
    def takes_token_ids(self) -> bool:
        """Whether inputs are integer token ids (a text model), not float features."""
        return bool(getattr(self.layers[0], "takes_token_ids", False))

    def _token_ids(self, x: Any) -> Any:
        """Integer ids for the first layer; floats are accepted when they hold whole numbers."""
        ids = self.xp.asarray(x)
        if ids.dtype.kind == "f":
            if not bool(self.xp.all(ids == self.xp.floor(ids))):
                raise ValueError("token ids must be whole numbers")
            ids = ids.astype(self.xp.int64)
        elif ids.dtype.kind not in "iu":
            raise ValueError(f"token ids must be integers, got dtype {ids.dtype}")
        self.layers[0].check_ids(ids)
        return ids

    def forward(self, x: Any, training: bool = False) -> Any:
        """x: (batch, *input_shape) -> outputs (batch, *output_shape).

        A text model takes integer ids (batch, time), kept integer and checked
        against the vocabulary; any other model casts its input to the model's dtype.
        """
        if self.takes_token_ids:
            x = self._token_ids(x)
        else:
            x = self.xp.asarray(x, dtype=self.dtype)
        # A batch of no samples has no outputs: the layers do not run (nothing of theirs,
        # batchnorm's running statistics say, changes).
        self._no_samples = len(x) == 0
        if self._no_samples:
            if tuple(x.shape[1:]) != tuple(self.input_shape):
                raise ValueError(
                    f"inputs must be (batch, {', '.join(map(str, self.input_shape))}), "
                    f"got {tuple(x.shape)}"
                )
            return self.xp.zeros((0, *self.output_shape), dtype=self.dtype)
        if is_image(self.input_shape):
            x = x.transpose(0, 2, 3, 1)  # NCHW -> NHWC
            if self.input_shape[0] > 1:
                x = self.xp.ascontiguousarray(x)
        for layer in self._run_order:
            x = layer.forward(x, training)
        if is_image(self.output_shape):
            x = x.transpose(0, 3, 1, 2)
        return x

    def backward(self, doutputs: Any) -> None:
        """Accumulate every layer's gradients from d(loss)/d(outputs)."""
        if self._no_samples:
            for layer in self.layers:
                layer.backward_no_samples()
            return
        dy = doutputs
        if is_image(self.output_shape):
            dy = dy.transpose(0, 2, 3, 1)
        for layer in reversed(self._run_order):
            dy = layer.backward(dy)

    def zero_grad(self) -> None:
        for layer in self.layers:
            layer.zero_grad()

    @property
    def groupable(self) -> bool:
        """Whether :meth:`set_groups` may run several groups of samples as one batch:
        every layer treats each sample alone, and no layer keeps running statistics."""
        return all(layer.groupable and not layer.buffers for layer in self.layers)

    def set_groups(
        self,
        bounds: Sequence[int] | None,
        grad_rows: Sequence[Any] = (),
        trees: Sequence[GroupTree] | None = None,
    ) -> None:
        """Run the next forward and backward on a batch of groups (only if
        :attr:`groupable`): samples ``bounds[i]:bounds[i + 1]`` are group ``i``, and
        the backward writes its gradients into ``grad_rows[i]`` (flat, laid out as
        :meth:`grad_views`), the numbers a backward of that group alone writes.
        With ``trees``, ``grad_rows[i]`` receives the sum of those numbers over the
        groups of ``trees[i]``, added pairwise along it (a :data:`core.layers.base.GroupTree`).
        ``None``: back to one batch, gradients into each layer's ``grads``."""
        if bounds is None:
            for layer in self.layers:
                layer.set_groups(None)
            return
        if not self.groupable:
            raise ValueError("this model cannot run groups as one batch (see Model.groupable)")
        views = [iter(self.grad_views(row)) for row in grad_rows]
        for layer in self.layers:
            grads = [{key: next(v) for key in layer.params} for v in views]
            layer.set_groups(bounds, grads, trees)

    def __call__(self, x: Any, training: bool = False) -> Any:
        return self.forward(x, training)

    # --- parameters and state ----------------------------------------------------

    def parameters(self) -> Iterator[tuple[str, Any, Any]]:
        """``(name, param, grad)`` for every parameter; names are ``"<layer>.<key>"``."""
        for index, layer in enumerate(self.layers):
            for key, param in layer.params.items():
                yield f"{index}.{key}", param, layer.grads[key]

    def grad_views(self, flat: Any) -> list[Any]:
        """Views of ``flat`` (1-D, at least as long as all the parameters together) shaped
        like each parameter's gradient, in :meth:`parameters` order; kept per array, so
        binding the same array again hands out the same views."""
        cache = self.__dict__.setdefault("_grad_views", {})
        held = cache.get(id(flat))
        if held is None or held[0] is not flat:
            views, offset = [], 0
            for _, param, _ in self.parameters():
                views.append(flat[offset : offset + param.size].reshape(param.shape))
                offset += param.size
            held = cache[id(flat)] = (flat, views)
            while len(cache) > _GRAD_VIEWS_KEPT:  # a caller that hands in new arrays each time
                del cache[next(iter(cache))]
        return held[1]

    def bind_grads(self, flat: Any) -> None:
        """Make every layer's gradients views of ``flat``: a backward writes into it."""
        views = iter(self.grad_views(flat))
        for layer in self.layers:
            for key in layer.params:
                layer.grads[key] = next(views)

    def bind_params(self, flat: Any) -> None:
        """Copy the parameters into ``flat`` and make them views of it from now on
        (laid out as :meth:`grad_views`)."""
        views = iter(self.grad_views(flat))
        for layer in self.layers:
            for key, param in list(layer.params.items()):
                view = next(views)
                if view is not param:
                    view[...] = param
                    layer.params[key] = view

    def layer_names(self) -> list[str]:
        """``"<index>.<type>"`` of each layer, the names of the per-layer diagnostics."""
        return [f"{index}.{layer.type}" for index, layer in enumerate(self.layers)]

    @property
    def num_params(self) -> int:
        return sum(int(p.size) for _, p, _ in self.parameters())

    def state_dict(self) -> dict[str, np.ndarray]:
        """Parameters and buffers by name, as NumPy arrays (copies), ready for ``np.savez``."""
        state: dict[str, np.ndarray] = {}
        for index, layer in enumerate(self.layers):
            for key, value in (*layer.params.items(), *layer.buffers.items()):
                state[f"{index}.{key}"] = to_numpy(value).copy()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Copy arrays in place; every name must be present with its shape."""
        expected = {
            f"{index}.{key}": target
            for index, layer in enumerate(self.layers)
            for key, target in (*layer.params.items(), *layer.buffers.items())
        }
        missing = sorted(set(expected) - set(state))
        if missing:
            raise ValueError(f"state is missing {missing}")
        for name, target in expected.items():
            value = np.asarray(state[name])
            if value.shape != target.shape:
                raise ValueError(f"{name}: shape {value.shape}, expected {target.shape}")
            target[...] = self.xp.asarray(value, dtype=target.dtype)

    def summary(self) -> ModelSummary:
        return summarize(self.spec, self.input_shape)


def build_model(
    spec: ModelSpec | dict[str, Any],
    input_shape: Shape,
    *,
    seed: int = 0,
    dtype: str = "float32",
    device: str = "cpu",
    num_classes: int | None = None,
    label_shape: Shape | None = None,
    vocab_size: int | None = None,
) -> Model:
    """A model from its spec, shapes inferred from ``input_shape`` (per sample).

    Raises :class:`SpecError` naming the layer and field when the spec is invalid
    or does not fit the input (or what is given of the dataset, as :func:`summarize`).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    model_spec = parse_model_spec(spec)
    layers = _infer_layers(model_spec, tuple(input_shape), num_classes, label_shape, vocab_size)
    xp = get_xp(device)
    for index, layer in enumerate(layers):
        layer.needs_input_grad = index > 0
        layer.init(xp, dtype, np.random.default_rng([seed, index]), he=_feeds_relu(layers, index))
    return Model(model_spec, layers, tuple(input_shape), dtype=dtype, device=device, seed=seed)
