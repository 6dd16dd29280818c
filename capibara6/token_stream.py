"""Bridge a blocking backend generation (worker thread) to an async iterator (event loop).

The worker thread runs `job()`, which prepares the prompt and returns the backend's token
iterator; each event is handed to the loop with `call_soon_threadsafe`, so the event loop never
blocks on inference. `aclose()` cancels between tokens and waits for the thread to leave the
backend, so a lease is never released while its model is still in use. The worker runs inside
`crash.model_context(model)`, so a fatal signal in the backend's native code names the model.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Callable, Iterator

from . import crash
from .types import TokenEvent

_DONE = object()


class TokenStream:
    def __init__(self, job: Callable[[threading.Event], Iterator[TokenEvent]], model: str | None = None) -> None:
        """`model`: the id of the model `job` runs (named by the crash log line; None: unnamed)."""
        self.cancel = threading.Event()
        self._job = job
        self._model = model
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._finished = asyncio.Event()
        self._thread = threading.Thread(target=self._work, name="capibara6-gen", daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    def _work(self) -> None:
        try:
            with crash.model_context(self._model):
                for event in self._job(self.cancel):
                    self._put(event)
                    if self.cancel.is_set():
                        break
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
