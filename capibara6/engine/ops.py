"""Picks the op implementation for the engine: the C `kernels` library, or the numpy reference."""

from __future__ import annotations

import logging
from types import ModuleType

from . import ops_numpy

log = logging.getLogger(__name__)


def load_ops(prefer: str = "auto") -> ModuleType:
    """"kernels" (required), "numpy" (reference), or "auto" (kernels when importable)."""
    if prefer == "numpy":
        return ops_numpy
    try:
        from capibara6 import kernels  # the project's C kernel library (numpy API, GIL released)
    except ImportError:
        if prefer == "kernels":
            raise
        log.warning("kernels not importable; native engine falls back to the slow numpy ops")
        return ops_numpy
    return kernels


def ops_name(ops: ModuleType) -> str:
    return "numpy" if ops is ops_numpy else "kernels"
