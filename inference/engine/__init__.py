"""R3MES inference engine: PyTorch, plus one C++ int4 kernel (int4mm.cpp, built on first use); no Django
imports anywhere in this package."""

from .engine import Engine
from .errors import (
    AdapterError,
    ContextLengthExceeded,
    EngineError,
    MixtureError,
    ModelLoadError,
    TrainingError,
    UnknownAdapter,
    UnsupportedArchitecture,
    UnsupportedTensorType,
)
from .generate import Batch, SamplingParams, Sequence
from .model import ModelConfig, Transformer

__all__ = [
    "AdapterError", "Batch", "ContextLengthExceeded", "Engine", "EngineError", "MixtureError", "ModelConfig",
    "ModelLoadError", "SamplingParams", "Sequence", "TrainingError", "Transformer", "UnknownAdapter",
    "UnsupportedArchitecture", "UnsupportedTensorType",
]
