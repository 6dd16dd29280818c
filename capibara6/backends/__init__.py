"""Backend factory: registry entry -> loaded Backend. Imports are lazy so a process that never
uses a backend never pays for importing it."""

from __future__ import annotations

import importlib
from pathlib import Path

from ..config import ModelSpec, resolve_model_path
from .base import Backend

_CLASSES: dict[str, str] = {
    "llamacpp": "capibara6.backends.llamacpp:LlamaCppBackend",
    "llamacpp_batched": "capibara6.backends.llamacpp_batched:LlamaCppBatchedBackend",
    "native": "capibara6.backends.native:NativeBackend",
    "remote": "capibara6.backends.remote:RemoteBackend",
}


def backend_class(name: str) -> type:
    module, _, cls = _CLASSES[name].partition(":")
    return getattr(importlib.import_module(module), cls)  # type: ignore[no-any-return]


def spec_class(spec: ModelSpec) -> type:
    """The class `load_backend` uses for this entry: llamacpp with parallel > 1 batches."""
    if spec.backend == "llamacpp" and spec.parallel > 1:  # continuous batching: one context, many sequences
        return backend_class("llamacpp_batched")
    return backend_class(spec.backend)


def load_backend(model_id: str, spec: ModelSpec, base_dir: Path, n_threads: int) -> Backend:
    """Load one instance (blocking: call from a worker thread). Raises on any load failure."""
    cls = spec_class(spec)
    # remote entries carry a URL in spec.source.url and get no path
    path = None if spec.backend == "remote" else resolve_model_path(spec, base_dir)
    return cls.load(model_id, path, spec, n_threads)  # type: ignore[no-any-return]
