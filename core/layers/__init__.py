"""Layers of the engine, by their spec ``type``."""

from __future__ import annotations

from core.layers.activations import GELU, Dropout, LeakyReLU, ReLU, Sigmoid, Tanh
from core.layers.attention import SelfAttention, TransformerBlock
from core.layers.base import Layer, Shape, ShapeError
from core.layers.conv import AvgPool2d, Conv2d, Flatten, GlobalAvgPool, MaxPool2d
from core.layers.dense import Dense
from core.layers.embedding import Embedding, MeanPool, PositionalEmbedding
from core.layers.norm import BatchNorm, LayerNorm

LAYERS: dict[str, type[Layer]] = {
    cls.type: cls
    for cls in (
        Dense,
        Conv2d,
        MaxPool2d,
        AvgPool2d,
        GlobalAvgPool,
        Flatten,
        ReLU,
        LeakyReLU,
        Tanh,
        Sigmoid,
        GELU,
        Dropout,
        BatchNorm,
        LayerNorm,
        Embedding,
        PositionalEmbedding,
        SelfAttention,
        TransformerBlock,
        MeanPool,
    )
}

__all__ = ["LAYERS", "Layer", "Shape", "ShapeError"]
