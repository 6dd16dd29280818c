"""SSE responses: sse-starlette's `EventSourceResponse` carrying our exact OpenAI framing.

    200 + headers ─ [: ping]* ─ data: {role chunk} ─ data: {token} ─ [: ping]* ─ ... ─ data: [DONE]

Why each piece is the way it is (read in sse-starlette 3.7.0, `sse_starlette/sse.py`):
- Framing: every chunk the body yields is a whole event already in bytes (`data: {...}\\n\\n`);
  `ensure_bytes` passes bytes through untouched, and `sep="\\n"` (its default is `\\r\\n`) keeps the
  library's own events (our ping) in the same line ending. Named events (the Responses API's
  `event: response.created\ndata: {...}\n\n`) are whole bytes the same way.
- Pings are ours, not the library's `_ping` task (so `ping=0`, which since 3.4.11 starts no ping
  task at all): its task pings on a fixed clock whatever the stream does, and it sends data chunks
  without the `_send_lock` the ping takes, so a ping can land after `data: [DONE]` while the body
  iterator finishes. `IdlePings` below sends `: ping` only after `ping_s` of silence, from the
  same iterator as the data, so the order of lines is exact.
- Disconnects: the library's `_listen_for_disconnect` is the only watcher (we never poll
  `request.is_disconnected()` on a stream). On `http.disconnect` it cancels the response's task
  group; the cancellation reaches the body wherever it waits (queue, load, prefill, next token),
  and `cleanup` then returns the queue place or the lease.
- Shutdown belongs to our Drain (capibara6/shutdown.py): the library's automatic drain would cancel
  every stream at SIGTERM instead of giving running generations the grace, so it is switched off.
- `send_timeout`: a client that has not taken a chunk for SEND_TIMEOUT_S (its socket buffers are
  full) is treated as gone, so a stalled reader cannot hold a model slot forever.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, AsyncIterator, Awaitable, Callable

from sse_starlette import EventSourceResponse, ServerSentEvent
from sse_starlette.sse import AppStatus, SendTimeoutError
from starlette.types import Receive, Scope, Send

from ..errors import ApiError
from .framing import sse_error

log = logging.getLogger("capibara6.api")

SEP = "\n"
PING = ServerSentEvent(comment="ping", sep=SEP).encode()  # b": ping\n\n"
SEND_TIMEOUT_S = 30.0
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

AppStatus.disable_automatic_graceful_drain()  # process-wide: our Drain decides when streams end


async def after(
    opening: Awaitable[Any], chunks: AsyncIterator[bytes], on_error: Callable[[ApiError], bytes] = sse_error
) -> AsyncIterator[bytes]:
    """`chunks` once `opening` (queue, load, expert fan-out) is done. The headers are out by now,
    so a failure of either ends the stream as one error event, `on_error(err)` (by default
    `data: {"error": ...}` and no [DONE]; the drain's cut-off says it the same way:
    capibara6/api/middleware.py), never as a cut connection. The Responses API passes its own
    framer (a named `event: error`)."""
    try:
        await opening
        async for chunk in chunks:
            yield chunk
    except ApiError as err:
        yield on_error(err)
    except Exception as err:  # a bug or a backend crash: logged with its traceback, told as a 500
        log.exception("stream failed")
        yield on_error(ApiError(f"Internal error: {type(err).__name__}.", code="internal_error"))


class IdlePings:
    """`source`'s chunks, plus a `: ping` comment whenever `ping_s` pass without one.

    Each step of `source` runs in a task of its own, so a ping never cancels the pending step
    (cancelling an async generator mid-await would end it). When the response is cancelled the
    pending step keeps running until `settle()` cancels it and waits, outside the response's
    cancel scope (anyio re-cancels every await inside it).
    """

    def __init__(self, source: AsyncIterator[bytes], ping_s: float) -> None:
        self._source = source
        self._ping_s = ping_s
        self._step: asyncio.Task[bytes | None] | None = None

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while True:
            self._step = asyncio.ensure_future(_next(self._source))
            while not (await asyncio.wait({self._step}, timeout=self._ping_s))[0]:
                yield PING
            chunk = self._step.result()
            if chunk is None:
                return
            yield chunk

    async def settle(self) -> None:
        step = self._step
        if step is None:
            return
        step.cancel()
        await asyncio.gather(step, return_exceptions=True)


async def _next(source: AsyncIterator[bytes]) -> bytes | None:
    try:
        return await source.__anext__()
    except StopAsyncIteration:
        return None


class EventStream(EventSourceResponse):
    """An OpenAI SSE response: `opening` (a task already running: queue, load, expert fan-out)
    is awaited after the headers, then `chunks` are sent. However it ends (done, client gone,
    drain), `opening` is cancelled and settled, then `aclose` returns the queue place or lease."""

    def __init__(
        self,
        opening: asyncio.Future[Any],
        chunks: AsyncIterator[bytes],
        aclose: Callable[[], Awaitable[None]],
        ping_s: float,
        on_error: Callable[[ApiError], bytes] = sse_error,
    ) -> None:
        body = after(opening, chunks, on_error)
        self._pinged = IdlePings(body, ping_s) if ping_s > 0 else None
        super().__init__(
            self._pinged if self._pinged is not None else body,
            headers=HEADERS, ping=0, sep=SEP, send_timeout=SEND_TIMEOUT_S,
        )
        self._opening = opening
        self._aclose = aclose

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except SendTimeoutError:  # the client stopped reading: it is gone, not a server error
            log.warning("stream: client took nothing for %.0f s; closed", SEND_TIMEOUT_S)
        finally:
            await self._close()

    async def _close(self) -> None:
        try:
            if self._pinged is not None:
                await self._pinged.settle()
            self._opening.cancel()
            await asyncio.gather(self._opening, return_exceptions=True)
        finally:
            await self._aclose()


__all__ = ["PING", "EventStream", "IdlePings", "after"]
