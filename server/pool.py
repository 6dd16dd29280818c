"""Model pool: every model access goes through `pool.lease(model_id)`.

This is the spine's version: a model loads on first use (one load shared by concurrent requests)
and stays loaded; one generation at a time per instance, others wait in arrival order.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from .backends import load_backend
from .backends.base import Backend
from .config import ModelSpec, Registry
from .errors import ModelNotFound, ServiceUnavailable
from .metrics import Metrics
from .threads import resolve_threads

log = logging.getLogger("capibara6.pool")

Loader = Callable[[str, ModelSpec, int], Backend]


@dataclass
class _Slot:
    spec: ModelSpec
    state: str = "unloaded"  # unloaded | loading | ready | busy
    backend: Backend | None = None
    leases: int = 0
    load_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    gate: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(1))


class ModelPool:
    def __init__(self, registry: Registry, loader: Loader | None = None, metrics: Metrics | None = None) -> None:
        self.registry = registry
        self.metrics = metrics or Metrics()
        self.metrics.watch_pool(self)
        self._loader = loader or (lambda mid, spec, n: load_backend(mid, spec, registry.base_dir, n))
        self._slots = {mid: _Slot(spec) for mid, spec in registry.models.items()}

    def status(self, model_id: str) -> str:
        return self._slots[model_id].state

    def metric_snapshot(self) -> list[tuple[str, str, int]]:
        out = []
        for mid, slot in self._slots.items():
            kv = getattr(slot.backend, "kv_cache_bytes", None)
            out.append((mid, slot.state, int(kv()) if callable(kv) else 0))
        return out

    def loaded(self, model_id: str) -> Backend | None:
        return self._slots[model_id].backend

    def _slot(self, model_id: str) -> _Slot:
        slot = self._slots.get(model_id)
        if slot is None:
            raise ModelNotFound(model_id)
        return slot

    async def _ensure_loaded(self, model_id: str, slot: _Slot) -> Backend:
        async with slot.load_lock:  # single flight: waiters find the model loaded
            if slot.backend is not None:
                return slot.backend
            slot.state = "loading"
            threads = resolve_threads(slot.spec.n_threads)
            t0 = time.monotonic()
            try:
                slot.backend = await asyncio.to_thread(self._loader, model_id, slot.spec, threads)
            except Exception as err:  # any load failure: this model is unavailable, others serve
                slot.state = "unloaded"
                log.warning("loading %s failed: %s", model_id, err)
                raise ServiceUnavailable(f"Model '{model_id}' could not be loaded: {err}") from err
            slot.state = "ready"
            self.metrics.loads.labels(model_id).inc()
            self.metrics.load_time.labels(model_id).observe(time.monotonic() - t0)
            return slot.backend

    @asynccontextmanager
    async def lease(self, model_id: str) -> AsyncIterator[Backend]:
        """Exclusive use of a loaded instance for one generation."""
        slot = self._slot(model_id)
        async with slot.gate:
            backend = await self._ensure_loaded(model_id, slot)
            slot.leases += 1
            slot.state = "busy"
            try:
                yield backend
            finally:
                slot.leases -= 1
                if slot.leases == 0:
                    slot.state = "ready"

    async def close(self) -> None:
        for mid, slot in self._slots.items():
            if slot.backend is not None:
                await asyncio.to_thread(slot.backend.close)
                slot.backend = None
                slot.state = "unloaded"
                self.metrics.unloads.labels(mid, "shutdown").inc()
