"""The one way a completion request becomes a response, and the one place it is counted.

`respond` serves a plan on one model: a JSON body, or an SSE stream whose headers go out as soon
as the request has to wait (queue, load) or its prompt is accepted. `count_request` adds the
request to `capibara6_requests_total` exactly once, whether it was answered, refused by an
exception handler, or cut by a disconnect (499).
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from ..errors import ApiError
from ..serving import Generation, Plan
from .framing import complete_json, stream_sse
from .requests import ENDPOINTS
from .state import app_role, app_state
from .streaming import EventStream

T = TypeVar("T")


def error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def count_request(request: Request, model: str | None, status: int) -> None:
    """`requests_total{model, role, endpoint, status}` once per completion request. `model`: a
    registry id, an ensemble name, `_custom` (an ad-hoc expert list) or anything else (`_unknown`)."""
    endpoint = ENDPOINTS.get(request.url.path)
    if endpoint is None or getattr(request.state, "counted", False):
        return
    state = app_state(request)
    state.pool.metrics.requests.labels(state.pool.metrics.model_label(model or "_unknown"), app_role(request), endpoint, str(status)).inc()
    request.state.counted = True


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Run `work`; cancel it when the client goes away. Non-streaming requests only: a stream
    has sse-starlette's disconnect watcher (capibara6/api/streaming.py), and two would race for
    the same `receive()` messages."""
    task = asyncio.ensure_future(work)
    while True:
        done, _ = await asyncio.wait({task}, timeout=0.05)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            try:
                await task
            except BaseException:
                pass
            raise asyncio.CancelledError("client disconnected")


async def counted(request: Request, model: str, work: Awaitable[Response]) -> Response:
    """Await `work` (a response), counting its status: the error's, 499 on a disconnect, 500 else."""
    status = 500
    try:
        response = await work
        status = response.status_code
        return response
    except ApiError as err:
        status = err.status
        raise
    except asyncio.CancelledError:
        status = 499  # client closed the request
        raise
    finally:
        count_request(request, model, status)


async def respond(request: Request, plan: Plan, want_lp: bool, stream: bool, include_usage: bool) -> Response:
    """Serve `plan` on its one model: JSON, or a stream (see open_stream)."""
    return await counted(request, plan.model, _respond(request, plan, want_lp, stream, include_usage))


async def _respond(request: Request, plan: Plan, want_lp: bool, stream: bool, include_usage: bool) -> Response:
    state = app_state(request)
    state.service.check_limits(plan.model, plan.n, plan.max_tokens, plan.params.stop)
    gen = state.service.generation(plan)
    if not stream:
        async def run() -> dict[str, Any]:
            async with gen:
                await gen.start()
                return await complete_json(gen, want_lp)

        return JSONResponse(await until_disconnect(request, run()))
    return await open_stream(gen, want_lp, include_usage, state.settings.sse_ping_s)


def _set(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


async def open_stream(gen: Generation, want_lp: bool, include_usage: bool, ping_s: float) -> Response:
    """A chat/completions stream of `gen` (see open_generation)."""
    opening = await open_generation(gen)
    return EventStream(opening, stream_sse(gen, want_lp, include_usage), gen.aclose, ping_s)


async def open_generation(gen: Generation) -> asyncio.Future[None]:
    """Start `gen` and return once the headers may go out: as soon as the request has to wait
    (queue, load) or its prompt is accepted (before the prefill), whichever comes first.
    Everything decided before that (QueueFull at enqueue, shutting down, a prompt over the
    context) raises here, so it is still a plain JSON error with its status; what fails later is
    told in the stream. Returns the opening task, for the EventStream to await after the headers."""
    waiting: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    opening = asyncio.ensure_future(gen.open(on_wait=lambda: _set(waiting)))
    try:
        await asyncio.wait({opening, waiting}, return_when=asyncio.FIRST_COMPLETED)
        if opening.done():
            opening.result()
    except BaseException:
        opening.cancel()
        await asyncio.gather(opening, return_exceptions=True)
        await gen.aclose()
        raise
    return opening


__all__ = ["count_request", "counted", "error_response", "open_stream", "respond", "until_disconnect"]
