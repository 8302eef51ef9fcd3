"""R3MES inference engine: PyTorch, plus two C++ kernels built on first use (int4mm.cpp: dense int4;
ternary.cpp: BitNet b1.58); no Django imports anywhere in this package."""

from .engine import Engine
from .errors import (
    AdapterError,
    ContextLengthExceeded,
    EngineError,
    MixtureError,
    ModelLoadError,
    QuantModeError,
    TrainingError,
    UnknownAdapter,
    UnsupportedArchitecture,
    UnsupportedTensorType,
)
from .generate import Batch, SamplingParams, Sequence
from .model import ModelConfig, Transformer

__all__ = [
    "AdapterError", "Batch", "ContextLengthExceeded", "Engine", "EngineError", "MixtureError", "ModelConfig",
    "ModelLoadError", "QuantModeError", "SamplingParams", "Sequence", "TrainingError", "Transformer", "UnknownAdapter",
    "UnsupportedArchitecture", "UnsupportedTensorType",
]
