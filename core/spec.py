"""The JSON spec of a model and of a training job, as pydantic models.

One definition, used by the engine, the workers and the API alike. Every field
has bounds; a value out of bounds is a :class:`core.SpecError` that names it.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from core.errors import SpecError

MAX_LAYERS = 256
MAX_UNITS = 65_536
MAX_CHANNELS = 4_096
MAX_KERNEL = 64
MAX_VOCAB = 1_048_576
MAX_CONTEXT = 65_536
MAX_HEADS = 256


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- layers -----------------------------------------------------------------


class DenseSpec(_Spec):
    type: Literal["dense"]
    units: int = Field(ge=1, le=MAX_UNITS)


class Conv2dSpec(_Spec):
    type: Literal["conv2d"]
    filters: int = Field(ge=1, le=MAX_CHANNELS)
    kernel_size: int = Field(ge=1, le=MAX_KERNEL)
    stride: int = Field(default=1, ge=1, le=MAX_KERNEL)
    padding: int = Field(default=0, ge=0, le=MAX_KERNEL)


class MaxPool2dSpec(_Spec):
    type: Literal["maxpool2d"]
    pool_size: int = Field(ge=1, le=MAX_KERNEL)
    stride: int | None = Field(default=None, ge=1, le=MAX_KERNEL)


class AvgPool2dSpec(_Spec):
    type: Literal["avgpool2d"]
    pool_size: int = Field(ge=1, le=MAX_KERNEL)
    stride: int | None = Field(default=None, ge=1, le=MAX_KERNEL)


class GlobalAvgPoolSpec(_Spec):
    type: Literal["global_avgpool"]


class FlattenSpec(_Spec):
    type: Literal["flatten"]


class ReluSpec(_Spec):
    type: Literal["relu"]


class LeakyReluSpec(_Spec):
    type: Literal["leaky_relu"]
    negative_slope: float = Field(default=0.01, ge=0.0, le=1.0)


class TanhSpec(_Spec):
    type: Literal["tanh"]


class SigmoidSpec(_Spec):
    type: Literal["sigmoid"]


class GeluSpec(_Spec):
    type: Literal["gelu"]


class DropoutSpec(_Spec):
    type: Literal["dropout"]
    rate: float = Field(ge=0.0, lt=1.0)


class BatchNormSpec(_Spec):
    type: Literal["batchnorm"]
    eps: float = Field(default=1e-5, gt=0.0, le=1.0)
    momentum: float = Field(default=0.1, ge=0.0, le=1.0)


class LayerNormSpec(_Spec):
    type: Literal["layernorm"]
    eps: float = Field(default=1e-5, gt=0.0, le=1.0)


class EmbeddingSpec(_Spec):
    type: Literal["embedding"]
    vocab_size: int = Field(ge=2, le=MAX_VOCAB)
    dim: int = Field(ge=1, le=MAX_UNITS)


class PositionalEmbeddingSpec(_Spec):
    type: Literal["positional_embedding"]
    max_len: int = Field(ge=1, le=MAX_CONTEXT)


class SelfAttentionSpec(_Spec):
    type: Literal["self_attention"]
    heads: int = Field(ge=1, le=MAX_HEADS)
    causal: bool = False


class TransformerBlockSpec(_Spec):
    type: Literal["transformer_block"]
    heads: int = Field(ge=1, le=MAX_HEADS)
    causal: bool = True
    mlp_ratio: float = Field(default=4.0, gt=0.0, le=16.0)


class MeanPoolSpec(_Spec):
    """Mean over the time axis: (time, dim) -> (dim,)."""

    type: Literal["mean_pool"]


LayerSpec = Annotated[
    DenseSpec
    | Conv2dSpec
    | MaxPool2dSpec
    | AvgPool2dSpec
    | GlobalAvgPoolSpec
    | FlattenSpec
    | ReluSpec
    | LeakyReluSpec
    | TanhSpec
    | SigmoidSpec
    | GeluSpec
    | DropoutSpec
    | BatchNormSpec
    | LayerNormSpec
    | EmbeddingSpec
    | PositionalEmbeddingSpec
    | SelfAttentionSpec
    | TransformerBlockSpec
    | MeanPoolSpec,
    Field(discriminator="type"),
]

LOSSES = ("softmax_cross_entropy", "mse", "binary_cross_entropy")
LossName = Literal["softmax_cross_entropy", "mse", "binary_cross_entropy"]


class ModelSpec(_Spec):
    layers: list[LayerSpec] = Field(min_length=1, max_length=MAX_LAYERS)
    loss: LossName


# --- optimizers and schedules -------------------------------------------------


class ScheduleSpec(_Spec):
    """How the learning rate moves over training.

    ``constant``: ``lr`` throughout; ``step``: ``lr * gamma ** (epoch // step_epochs)``;
    ``cosine``: from ``lr`` down to ``min_lr`` over all steps. Any of them may
    start with ``warmup_steps`` of linear warmup from 0.
    """

    type: Literal["constant", "step", "cosine"] = "constant"
    warmup_steps: int = Field(default=0, ge=0, le=10_000_000)
    step_epochs: int = Field(default=10, ge=1, le=100_000)
    gamma: float = Field(default=0.1, gt=0.0, le=1.0)
    min_lr: float = Field(default=0.0, ge=0.0, le=10.0)


#: A decay rate of Adam's moment estimates, in [0, 1) as ``torch.optim.Adam`` demands:
#: at 1 the bias correction ``1 / (1 - beta ** t)`` divides by zero.
Beta = Annotated[float, Field(ge=0.0, lt=1.0)]


class _OptimizerBase(_Spec):
    lr: float = Field(gt=0.0, le=10.0)
    weight_decay: float = Field(default=0.0, ge=0.0, le=1.0)
    schedule: ScheduleSpec = ScheduleSpec()


class SgdSpec(_OptimizerBase):
    type: Literal["sgd"]
    momentum: float = Field(default=0.0, ge=0.0, lt=1.0)
    dampening: float = Field(default=0.0, ge=0.0, le=1.0)
    nesterov: bool = False

    @field_validator("nesterov")
    @classmethod
    def _nesterov_needs_momentum(cls, nesterov: bool, info: ValidationInfo) -> bool:
        # as torch.optim.SGD: without momentum, or with dampening, it would be another rule
        momentum, dampening = info.data.get("momentum"), info.data.get("dampening")
        if nesterov and (not momentum or dampening):
            raise ValueError(
                f"nesterov needs momentum > 0 and dampening 0, got momentum {momentum} and "
                f"dampening {dampening}"
            )
        return nesterov


class AdamSpec(_OptimizerBase):
    type: Literal["adam"]
    betas: tuple[Beta, Beta] = (0.9, 0.999)
    eps: float = Field(default=1e-8, gt=0.0, le=1.0)


class AdamWSpec(_OptimizerBase):
    type: Literal["adamw"]
    weight_decay: float = Field(default=0.01, ge=0.0, le=1.0)
    betas: tuple[Beta, Beta] = (0.9, 0.999)
    eps: float = Field(default=1e-8, gt=0.0, le=1.0)


OptimizerSpec = Annotated[SgdSpec | AdamSpec | AdamWSpec, Field(discriminator="type")]


# --- the job ------------------------------------------------------------------


class DatasetRef(_Spec):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_\-]{0,63}$")
    version: int | None = Field(default=None, ge=1)


class TrainingSpec(_Spec):
    epochs: int = Field(default=10, ge=1, le=10_000)
    batch_size: int = Field(default=64, ge=1, le=65_536)
    validation_split: float = Field(default=0.1, ge=0.0, lt=1.0)
    seed: int = Field(default=0, ge=0, le=2**32 - 1)
    checkpoint_every_epochs: int = Field(default=1, ge=1, le=10_000)
    grad_clip_norm: float | None = Field(default=None, gt=0.0)
    shuffle: bool = True
    log_every_steps: int = Field(default=50, ge=1, le=1_000_000)


class ResourcesSpec(_Spec):
    workers: int = Field(default=1, ge=1, le=64)
    device: Literal["cpu", "gpu"] = "cpu"


class JobSpec(_Spec):
    name: str = Field(min_length=1, max_length=128)
    dataset: DatasetRef
    model: ModelSpec
    optimizer: OptimizerSpec
    training: TrainingSpec = TrainingSpec()
    resources: ResourcesSpec = ResourcesSpec()
    priority: int = Field(default=0, ge=-1000, le=1000)
    max_retries: int = Field(default=2, ge=0, le=20)


# --- parsing with errors that name the field ---------------------------------------------


def parse_model_spec(spec: ModelSpec | dict[str, Any]) -> ModelSpec:
    """A validated :class:`ModelSpec`; raises :class:`SpecError` naming the field."""
    if isinstance(spec, ModelSpec):
        return spec
    return _parse(ModelSpec, spec, prefix=("model",))


def parse_optimizer_spec(spec: BaseModel | dict[str, Any]) -> SgdSpec | AdamSpec | AdamWSpec:
    if isinstance(spec, SgdSpec | AdamSpec | AdamWSpec):
        return spec
    holder = _parse(_OptimizerHolder, {"optimizer": spec}, prefix=())
    return holder.optimizer


def parse_job_spec(spec: JobSpec | dict[str, Any]) -> JobSpec:
    if isinstance(spec, JobSpec):
        return spec
    return _parse(JobSpec, spec, prefix=())


class _OptimizerHolder(_Spec):
    optimizer: OptimizerSpec


def _parse(model: type[BaseModel], data: Any, *, prefix: tuple[str | int, ...]) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise spec_error_from_validation(exc, prefix=prefix) from None


_TAGGED_UNIONS = ("layers", "optimizer")


def spec_error_from_validation(
    exc: ValidationError, *, prefix: tuple[str | int, ...] = ()
) -> SpecError:
    """The first error of a pydantic validation, as a :class:`SpecError`.

    Pydantic puts the union's tag into the path (``layers.3.dense.units``);
    the tag is dropped so the path reads as the user wrote the JSON.
    """
    first = exc.errors()[0]
    loc: list[str | int] = list(prefix)
    raw = list(first["loc"])
    layer: int | None = None
    layer_type: str | None = None
    for i, part in enumerate(raw):
        previous = raw[i - 1] if i else None
        before_previous = raw[i - 2] if i > 1 else None
        is_tag = isinstance(part, str) and (
            (previous == "optimizer") or (isinstance(previous, int) and before_previous == "layers")
        )
        if is_tag and i < len(raw) - 1:
            if previous != "optimizer":
                layer_type = str(part)
            continue
        if isinstance(previous, str) and previous == "layers" and isinstance(part, int):
            layer = part
        loc.append(part)
    if first["type"] in ("union_tag_invalid", "union_tag_not_found"):
        loc.append("type")
    reason = _reason(first)
    field = next((p for p in reversed(loc) if isinstance(p, str)), None)
    return SpecError(reason, layer=layer, layer_type=layer_type, field=field, loc=tuple(loc))


def _reason(error: Any) -> str:
    kind = error["type"]
    if kind == "union_tag_invalid":
        tags = error.get("ctx", {}).get("expected_tags", "")
        return f"unknown type {error['ctx']['tag']!r}; expected one of {tags}"
    if kind == "extra_forbidden":
        return "unknown field"
    if kind == "missing":
        return "field required"
    if kind == "value_error":  # a validator's own words, without pydantic's "Value error, "
        return str(error.get("ctx", {}).get("error", error["msg"]))
    return str(error["msg"])
