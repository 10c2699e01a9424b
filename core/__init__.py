"""trainq's backpropagation engine: NumPy (CuPy on a GPU), hand-written backward passes."""

from __future__ import annotations

from core.data import Dataset, DatasetUnavailable, load_dataset
from core.errors import SpecError
from core.losses import loss
from core.model import Model, ModelSummary, build_model, summarize
from core.optim import Optimizer, build_optimizer, clip_grad_norm, scheduled_lr
from core.spec import JobSpec, ModelSpec, parse_job_spec, parse_model_spec
from core.train import FitResult, Trainer, fit

__all__ = [
    "Dataset",
    "DatasetUnavailable",
    "FitResult",
    "JobSpec",
    "Model",
    "ModelSpec",
    "ModelSummary",
    "Optimizer",
    "SpecError",
    "Trainer",
    "build_model",
    "build_optimizer",
    "clip_grad_norm",
    "fit",
    "load_dataset",
    "loss",
    "parse_job_spec",
    "parse_model_spec",
    "scheduled_lr",
    "summarize",
]
