"""Typed errors of the inference engine.

Every message names the file, tensor or parameter at fault so an operator can act on it without
reading a traceback.
"""


class EngineError(Exception):
    """Base class: everything the engine raises on bad input derives from this."""


class ModelLoadError(EngineError):
    """A model file or directory is missing, truncated, not a model, or does not fit its config."""


class UnsupportedTensorType(ModelLoadError):
    """A GGUF tensor is stored in a quantisation type we cannot dequantise."""


class UnsupportedArchitecture(ModelLoadError):
    """The checkpoint's architecture / model_type is not one this engine implements."""


class QuantModeError(EngineError):
    """The quantisation asked for cannot run this checkpoint (int4 on a ternary one, ...)."""


class AdapterError(EngineError):
    """A DoRA adapter is malformed or does not fit the backbone (shapes, target modules, format)."""


class UnknownAdapter(AdapterError):
    """An adapter name was used that is not resident in the engine."""


class MixtureError(AdapterError):
    """Adapter mixture weights are negative or do not sum to a positive number."""


class ContextLengthExceeded(EngineError):
    """A prompt (plus the tokens asked for) does not fit in the model's context window."""


class TrainingError(EngineError):
    """The DoRA trainer was given an invalid setup (e.g. non-DoRA parameters left trainable)."""
