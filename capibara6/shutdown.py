"""Graceful shutdown: SIGTERM drains, then the process exits 0.

    SIGTERM/SIGINT -> draining: listeners stay open, new API requests get 503 `shutting_down`
                      (a load balancer sees a clear answer, not a refused connection), /ready 503
                   -> running requests get up to `grace_s` to finish (streams end with [DONE])
                   -> still running after the grace: cancelled (generation stops, leases return)
                   -> uvicorn servers exit, the caller unloads the models (pool.close())
    A second signal during the drain skips the rest of the grace.

`Drain` is shared by every role's app in one process; the request middleware registers each
in-flight API request with `track()` so the drain knows what it waits for and what to cancel.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from typing import Any, Callable, Iterator, Sequence

log = logging.getLogger("capibara6.shutdown")


class Drain:
    def __init__(self) -> None:
        self.draining = False
        self.cancelling = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._hurry = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    @contextlib.contextmanager
    def track(self) -> Iterator[None]:
        """Count the current task as an in-flight request for its whole life (streams included)."""
        task = asyncio.current_task()
        if task is None:
            yield
            return
        self._tasks.add(task)
        self._idle.clear()
        try:
            yield
        finally:
            self._tasks.discard(task)
            if not self._tasks:
                self._idle.set()

    def begin(self) -> bool:
        """Start draining; False if already draining (the caller then hurries it)."""
        if self.draining:
            self._hurry.set()
            return False
        self.draining = True
        return True

    async def run(self, grace_s: float) -> int:
        """Wait up to `grace_s` for in-flight requests, then cancel the rest. Returns how many were cancelled."""
        log.warning("draining", extra={"fields": {"in_flight": self.in_flight, "grace_s": grace_s}})
        idle = asyncio.ensure_future(self._idle.wait())
        hurry = asyncio.ensure_future(self._hurry.wait())
        try:
            await asyncio.wait({idle, hurry}, timeout=grace_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            idle.cancel()
            hurry.cancel()
        left = list(self._tasks)
        self.cancelling = True  # DrainGate ends these responses cleanly instead of a traceback
        for task in left:
            task.cancel()
        if left:
            log.warning("grace period over: cancelling requests", extra={"fields": {"cancelled": len(left)}})
            # let them unwind (generation threads stop between tokens, leases go back)
            await asyncio.wait(left, timeout=10.0)
        return len(left)


def install(
    loop: asyncio.AbstractEventLoop,
    drain: Drain,
    grace_s: float,
    stop_servers: Callable[[], None],
    signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT),
) -> None:
    """On a signal: drain, then `stop_servers()` (uvicorn should_exit). Idempotent per signal."""

    async def shutdown() -> None:
        try:
            await drain.run(grace_s)
        finally:
            stop_servers()

    def on_signal(signum: int) -> None:
        if drain.begin():
            log.warning("signal received: shutting down", extra={"fields": {"signal": signal.Signals(signum).name}})
            drain.task = loop.create_task(shutdown())  # held: a bare task may be garbage collected
        else:
            log.warning("second signal: skipping the rest of the grace period")

    for sig in signals:
        # Not on a Unix event loop (NotImplementedError) or not in the main thread (RuntimeError,
        # e.g. a test driving the app): no drain on signals there, the server still serves.
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, on_signal, sig)


__all__ = ["Drain", "install"]
