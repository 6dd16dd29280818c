"""/ready: "this process can generate now", proven by a tiny generation, cheaply.

Rules (in order), for the probe model (the first `pool.warmup` entry, else the first model):
- a cached verdict younger than `ttl_s` (ok) / `fail_ttl_s` (failed) is returned as is;
- the model is `busy`: it is generating right now, which is proof enough; the probe never queues
  behind inference;
- the model is unloaded or loading after a probe already succeeded: ready (it was idle-unloaded and
  loads on demand; probing would reload it every few seconds and defeat idle unload);
- otherwise one greedy token from a two-token prompt must arrive within `deadline_s`; if the
  deadline passes while the model became busy with a real request, that counts as ready too.
Concurrent /ready calls on every port share one probe in flight (single flight per pool).
"""

from __future__ import annotations

import asyncio
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from .config import Registry
from .token_stream import TokenStream
from .types import GenerationOutcome, SamplingParams, TextPrompt, TokenEvent


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str  # generated | busy | idle_unloaded | timeout | failed: ...
    model: str
    at: float


class ReadinessProbe:
    def __init__(
        self, pool: Any, model: str, ttl_s: float = 5.0, fail_ttl_s: float = 1.0, deadline_s: float = 15.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pool = pool
        self.model = model
        self.ttl_s, self.fail_ttl_s, self.deadline_s = ttl_s, fail_ttl_s, deadline_s
        self.clock = clock
        self._last: Verdict | None = None
        self._ever_ok = False
        self._inflight: asyncio.Future[None] | None = None

    def _fresh(self) -> Verdict | None:
        v = self._last
        if v is None:
            return None
        return v if self.clock() - v.at < (self.ttl_s if v.ok else self.fail_ttl_s) else None

    async def check(self) -> Verdict:
        cached = self._fresh()
        if cached:
            return cached
        status = self._status()
        if status == "busy":
            return self._remember(self._verdict(True, "busy"))
        if status in ("unloaded", "loading") and self._ever_ok:
            return self._remember(self._verdict(True, "idle_unloaded"))
        if self._inflight is None:
            # never cancelled: cancelling a lease mid-load or mid-token would only waste that work
            self._inflight = asyncio.ensure_future(self._generate_one())
            self._inflight.add_done_callback(self._probe_done)
        done, _ = await asyncio.wait({self._inflight}, timeout=self.deadline_s)
        if done:
            return self._last or self._verdict(False, "failed: no verdict")
        busy = self._status() == "busy"  # queued behind a real request: busy generating
        return self._verdict(busy, "busy" if busy else f"timeout ({status})")

    def _probe_done(self, task: asyncio.Future[None]) -> None:
        self._inflight = None
        err = None if task.cancelled() else task.exception()
        if task.cancelled():
            self._remember(self._verdict(False, "failed: cancelled"))
        elif err is not None:
            self._remember(self._verdict(False, f"failed: {getattr(err, 'message', None) or err}"))
        else:
            self._remember(self._verdict(True, "generated"))

    def _remember(self, v: Verdict) -> Verdict:
        self._last = v
        self._ever_ok |= v.ok
        return v

    def _status(self) -> str:
        return str(self.pool.status(self.model))

    def _verdict(self, ok: bool, reason: str) -> Verdict:
        return Verdict(ok, reason, self.model, self.clock())

    async def _generate_one(self) -> None:
        async with self.pool.lease(self.model, touch=False) as backend:  # probes keep the idle clock
            params = SamplingParams(max_tokens=1, temperature=0.0)

            def job(cancel: threading.Event) -> Iterator[TokenEvent]:
                return iter(backend.generate(backend.prepare(TextPrompt("Hi")), params, GenerationOutcome(), cancel))

            stream = TokenStream(job, model=self.model)
            try:
                async for _ in stream:
                    pass
            finally:
                await stream.aclose()


def probe_model(registry: Registry) -> str:
    return registry.pool.warmup[0] if registry.pool.warmup else next(iter(registry.models))


_shared: weakref.WeakKeyDictionary[Any, ReadinessProbe] = weakref.WeakKeyDictionary()


def shared_probe(pool: Any, registry: Registry) -> ReadinessProbe:
    """One probe per pool, so the three role apps of one process share its cache."""
    probe = _shared.get(pool)
    if probe is None:
        probe = _shared[pool] = ReadinessProbe(pool, probe_model(registry))
    return probe


__all__ = ["ReadinessProbe", "Verdict", "probe_model", "shared_probe"]
