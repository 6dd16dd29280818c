"""Bridge a blocking backend generation (worker thread) to an async iterator (event loop).

The worker thread runs `job()`, which prepares the prompt and returns the backend's token
iterator; each event is handed to the loop with `call_soon_threadsafe`, so the event loop never
blocks on inference. An iterator with a `relay(put)` method (a model worker's stream,
capibara6/workers/proxy.py) is asked to hand its events on itself instead: its reader thread puts
them on the loop directly, one thread hop less per token. The threads come from `IdleThreads`
(a thread start per stream was ~0.2 ms of TTFT: the event loop waits in `Thread.start()` until the
new thread runs). `aclose()` cancels between tokens and waits for the thread to leave the
backend, so a lease is never released while its model is still in use. The worker runs inside
`crash.model_context(model)`, so a fatal signal in the backend's native code names the model.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Callable, Iterator

from . import crash
from .threads import IdleThreads
from .types import TokenEvent

_DONE = object()

_threads = IdleThreads("capibara6-gen")


class TokenStream:
    def __init__(self, job: Callable[[threading.Event], Iterator[TokenEvent]], model: str | None = None) -> None:
        """`model`: the id of the model `job` runs (named by the crash log line; None: unnamed)."""
        self.cancel = threading.Event()
        self._job = job
        self._model = model
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._finished = asyncio.Event()
        _threads.run(self._work)

    def _put(self, item: Any) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    def _work(self) -> None:
        try:
            with crash.model_context(self._model):
                events = self._job(self.cancel)
                try:
                    relay = getattr(events, "relay", None)
                    if relay is not None:
                        relay(self._put)  # returns at the stream's end (it watches `cancel` itself)
                    else:
                        for event in events:
                            self._put(event)
                            if self.cancel.is_set():
                                break
                finally:
                    close = getattr(events, "close", None)
                    if close is not None:  # a generator left early: its cleanup runs now, here
                        close()
            self._put(_DONE)
        except BaseException as err:  # handed to the consumer, raised there
            self._put(err)
        finally:
            self._loop.call_soon_threadsafe(self._finished.set)

    def __aiter__(self) -> TokenStream:
        return self

    async def __anext__(self) -> TokenEvent:
        item = await self._queue.get()
        if item is _DONE:
            self._queue.put_nowait(_DONE)  # later calls keep ending
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        return item

    async def aclose(self) -> None:
        """Stop generation (if still running) and wait until the worker has left the backend."""
        self.cancel.set()
        try:
            await asyncio.shield(self._finished.wait())
        except asyncio.CancelledError:
            await self._finished.wait()  # the backend must be free before the lease goes back
            raise
