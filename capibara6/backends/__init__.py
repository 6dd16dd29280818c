"""Backend factory: registry entry -> backend class (the one place that reads `spec.backend`).

Imports are lazy so a process that never uses a backend never pays for importing it (llama.cpp's
shared library, httpx). Everything else talks to the class through `BackendClass` (base.py).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, cast

from ..config import resolve_model_path
from ..types import ZERO_ESTIMATE, Capabilities, Estimate
from .base import Backend, BackendClass

if TYPE_CHECKING:
    from ..config import ModelSpec

_CLASSES: dict[str, str] = {
    "llamacpp": "capibara6.backends.llamacpp.plain:LlamaCppBackend",
    "llamacpp_batched": "capibara6.backends.llamacpp.batched:LlamaCppBatchedBackend",
    "native": "capibara6.backends.native:NativeBackend",
    "native_batched": "capibara6.backends.native_batched:NativeBatchedBackend",
    "remote": "capibara6.backends.remote:RemoteBackend",
}


def _import(name: str) -> BackendClass:
    module, _, cls = _CLASSES[name].partition(":")
    return cast(BackendClass, getattr(importlib.import_module(module), cls))


def backend_class(spec: ModelSpec) -> BackendClass:
    """The class serving this entry: llamacpp or native with parallel > 1 batches in one instance."""
    if spec.backend in ("llamacpp", "native") and spec.parallel > 1:
        return _import(f"{spec.backend}_batched")
    return _import(spec.backend)


def model_path(spec: ModelSpec, base_dir: Path) -> Path | None:
    """The entry's local GGUF; None for a remote server. Raises FileNotFoundError / ImportError."""
    return None if spec.source.url else resolve_model_path(spec, base_dir)


def capabilities(spec: ModelSpec) -> Capabilities:
    return backend_class(spec).capabilities(spec)


def estimate(spec: ModelSpec, base_dir: Path) -> Estimate:
    """Bytes before loading; 0 when the file does not resolve (the load will fail and say why)."""
    try:
        path = model_path(spec, base_dir)
    except (OSError, ImportError, ValueError):
        return ZERO_ESTIMATE
    return backend_class(spec).estimate(spec, path)


def load_backend(model_id: str, spec: ModelSpec, base_dir: Path, n_threads: int) -> Backend:
    """Load one instance (blocking: call from a worker thread). Raises on any load failure."""
    return backend_class(spec).load(model_id, spec, model_path(spec, base_dir), n_threads)


__all__ = ["Backend", "BackendClass", "backend_class", "capabilities", "estimate", "load_backend", "model_path"]
