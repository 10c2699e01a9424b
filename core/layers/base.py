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
from types import ModuleType
from typing import Any, ClassVar

import numpy as np

Shape = tuple[int, ...]


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

    def describe(self) -> str:
        fields = self.spec.model_dump(exclude={"type"})
        inner = ", ".join(f"{k}={v}" for k, v in fields.items() if v is not None)
        return f"{self.type}({inner})"


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


def is_image(shape: Shape) -> bool:
    """Per-sample ``(C, H, W)``: travels channels-last inside the engine."""
    return len(shape) == 3
