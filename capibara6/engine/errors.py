"""Why a GGUF file cannot run on the native engine.

A model the engine does not support (tensor type, architecture, rope scaling) is a load error,
not a missing piece of code: the pool answers 503 `model_unavailable` with this message and the
other models keep serving. llama.cpp (backend `llamacpp`) runs such files.
"""


class UnsupportedModel(ValueError):
    """The GGUF uses something the native engine does not implement."""
