"""The consensus role's completion routes (port 8084): parse, resolve experts, dispatch, frame.

A request that names no ensemble, not `auto` and carries no `consensus` field is an ordinary
request and goes to the standard handler (`respond`), so a plain model id behaves as on 8082.
Everything else runs `orchestrator.service.ConsensusRun`; the response is a normal (chat)
completion plus a `consensus` field (in the final SSE chunk when streaming). A stream sends its
headers once the request is validated and pings while the experts run (a vote has nothing to
send before every expert is done); a quorum that fails then is told in the stream.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator, Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from ..errors import ApiError, InvalidRequest
from ..orchestrator.routing import ConsensusPlan, resolve
from ..orchestrator.service import ConsensusRun, question_of
from ..serving import Plan, new_id
from .framing import SSE_DONE, sse
from .protocol import ChatCompletionRequest, CompletionRequest
from .streaming import EventStream

Respond = Callable[[Request, Plan, bool, bool, bool], Awaitable[Response]]


def add_consensus_routes(app: FastAPI, state: Any, respond: Respond) -> None:
    """Register /v1/chat/completions and /v1/completions on the consensus app."""
    from .app import chat_plan, completion_plan, stream_mode, until_disconnect  # app imports us lazily

    async def dispatch(request: Request, req: ChatCompletionRequest | CompletionRequest, plan: Plan, want_lp: bool) -> Response:
        stream, include_usage = stream_mode(req, False)
        cplan = resolve(state.registry, req.model, req.consensus, question_of(plan.prompts[0]))
        if cplan is None:
            return await respond(request, plan, want_lp, stream, include_usage)
        _check(state, cplan, plan, want_lp)
        run = ConsensusRun(state.service, cplan, plan)
        endpoint = "chat" if plan.chat else "completions"
        status = 500
        try:
            if stream:
                status = 200
                opening = asyncio.ensure_future(run.prepare())
                return EventStream(opening, _sse(run, plan, req.model, include_usage), run.aclose, state.settings.sse_ping_s)
            try:
                await until_disconnect(request, run.prepare())
            except BaseException:
                await run.aclose()
                raise
            try:
                body = await until_disconnect(request, _json(run, plan, req.model))
            finally:
                await run.aclose()
            status = 200
            return JSONResponse(body)
        except ApiError as err:
            status = err.status
            raise
        except asyncio.CancelledError:
            status = 499
            raise
        finally:
            state.pool.metrics.requests.labels(cplan.name if cplan.name != "custom" else "_custom", "consensus", endpoint, str(status)).inc()
            request.state.counted = True

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest, request: Request) -> Response:
        plan, want_lp = chat_plan(req)
        return await dispatch(request, req, plan, want_lp)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Response:
        plan, want_lp = completion_plan(req)
        return await dispatch(request, req, plan, want_lp)


def _check(state: Any, cplan: ConsensusPlan, plan: Plan, want_lp: bool) -> None:
    """Limits every expert must respect, and what a merged answer cannot offer."""
    if plan.n != 1:
        raise InvalidRequest("n must be 1 on the consensus port (one merged answer).", param="n")
    if want_lp:
        raise InvalidRequest("logprobs are not available for a merged answer.", param="logprobs")
    if len(plan.prompts) != 1 or plan.echo:
        raise InvalidRequest("The consensus port takes one prompt and no echo.", param="prompt")
    for model in {*cplan.experts, cplan.judge, cplan.aggregator} - {None}:
        state.service.check_limits(model, 1, plan.max_tokens, plan.params.stop)


def _head(run_id: str, created: int, model: str, obj: str) -> dict[str, Any]:
    return {"id": run_id, "object": obj, "created": created, "model": model, "system_fingerprint": "capibara6"}


async def _json(run: ConsensusRun, plan: Plan, model: str) -> dict[str, Any]:
    text = "".join([p async for p in run.pieces()])
    finish = run.finish_reason or "stop"
    if plan.chat:
        head = _head(new_id("chatcmpl"), int(time.time()), model, "chat.completion")
        choice = {"index": 0, "message": {"role": "assistant", "content": text, "refusal": None}, "logprobs": None, "finish_reason": finish}
    else:
        head = _head(new_id("cmpl"), int(time.time()), model, "text_completion")
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    return {**head, "choices": [choice], "usage": run.usage(), "consensus": run.report()}


async def _sse(run: ConsensusRun, plan: Plan, model: str, include_usage: bool) -> AsyncIterator[bytes]:
    """OpenAI chunks: role, content, a finish chunk carrying `consensus`, optional usage, [DONE]."""
    obj = "chat.completion.chunk" if plan.chat else "text_completion"
    head = _head(new_id("chatcmpl" if plan.chat else "cmpl"), int(time.time()), model, obj)
    usage_null = {"usage": None} if include_usage else {}

    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
        if plan.chat:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": delta.get("content", ""), "logprobs": None, "finish_reason": finish}
        return sse({**head, "choices": [choice], **usage_null, **extra})

    if plan.chat:
        yield chunk({"role": "assistant", "content": ""})
    async for piece in run.pieces():
        yield chunk({"content": piece})
    yield chunk({}, run.finish_reason or "stop", consensus=run.report())
    if include_usage:
        yield sse({**head, "choices": [], "usage": run.usage()})
    yield SSE_DONE
