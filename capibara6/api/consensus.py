"""The consensus role's completion routes (port 8084): parse, resolve experts, dispatch, frame.

A request that names no ensemble, not `auto` and carries no `consensus` field is an ordinary
request: `consensus_response` returns None and the route serves it as on 8082 (one route per path,
consensus a choice made per request, not a second registration of the same paths).
Everything else runs `orchestrator.service.ConsensusRun`; the response is a normal (chat)
completion plus a `consensus` field (in the final SSE chunk when streaming). A stream sends its
headers once the request is validated and pings while the experts run (a vote has nothing to
send before every expert is done); a quorum that fails then is told in the stream.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from ..errors import InvalidRequest
from ..orchestrator.routing import ConsensusPlan, resolve
from ..orchestrator.service import ConsensusRun, question_of
from ..serving import Plan, new_id
from .framing import SSE_DONE, chunk_choice, final_choice, head, sse
from .protocol import ChatCompletionRequest, CompletionRequest
from .requests import stream_default, stream_mode
from .responses import counted, until_disconnect
from .state import app_state
from .streaming import EventStream


async def consensus_response(
    request: Request, req: ChatCompletionRequest | CompletionRequest, plan: Plan, want_lp: bool
) -> Response | None:
    """The merged answer when the request asks for consensus (an ensemble, `auto`, or a
    `consensus` field); None when it is an ordinary request for one model."""
    state = app_state(request)
    cplan = resolve(state.registry, req.model, req.consensus, question_of(plan.prompts[0]), whole=_whole_text(plan))
    if cplan is None:
        return None
    stream, include_usage = stream_mode(req, stream_default("consensus"))
    _check(state, cplan, plan, want_lp)
    run = ConsensusRun(state.service, cplan, plan)
    label = cplan.name if cplan.name != "custom" else "_custom"
    return await counted(request, label, _run(request, run, plan, req.model, stream, include_usage, state.settings.sse_ping_s))


def _whole_text(plan: Plan) -> str:
    """Everything the experts will read (every message, not only the last question): what
    routing by prompt length must count."""
    prompt = plan.prompts[0]
    if isinstance(prompt, str):
        return prompt
    if prompt and isinstance(prompt[0], dict):
        return "\n".join(str(m.get("content") or "") for m in prompt if isinstance(m, dict))
    return ""


async def _run(request: Request, run: ConsensusRun, plan: Plan, model: str, stream: bool, include_usage: bool,
               ping_s: float) -> Response:
    if stream:
        opening = asyncio.ensure_future(run.prepare())
        return EventStream(opening, _sse(run, plan, model, include_usage), run.aclose, ping_s)
    try:
        await until_disconnect(request, run.prepare())
    except BaseException:
        await run.aclose()
        raise
    try:
        body = await until_disconnect(request, _json(run, plan, model))
    finally:
        await run.aclose()
    return JSONResponse(body)


def _check(state: Any, cplan: ConsensusPlan, plan: Plan, want_lp: bool) -> None:
    """Limits every expert must respect, and what a merged answer cannot offer."""
    if plan.n != 1:
        raise InvalidRequest("n must be 1 on the consensus port (one merged answer).", param="n")
    if want_lp:
        raise InvalidRequest("logprobs are not available for a merged answer.", param="logprobs")
    if plan.tools is not None:
        # a merged answer is text; voting on calls (same name, equal arguments) is not built yet
        raise InvalidRequest("tools are not served on the consensus port: a merged answer is text; send tools to one "
                             "model on the standard or streaming port.", param="tools")
    if len(plan.prompts) != 1 or plan.echo:
        raise InvalidRequest("The consensus port takes one prompt and no echo.", param="prompt")
    for model in {*cplan.experts, cplan.judge, cplan.aggregator} - {None}:
        state.service.check_limits(model, 1, plan.max_tokens, plan.params.stop)


async def _json(run: ConsensusRun, plan: Plan, model: str) -> dict[str, Any]:
    text = "".join([p async for p in run.pieces()])
    top = head(new_id("chatcmpl" if plan.chat else "cmpl"), int(time.time()), model, plan.chat, chunk=False)
    choice = final_choice(plan.chat, 0, text, None, run.finish_reason or "stop")
    return {**top, "choices": [choice], "usage": run.usage(), "consensus": run.report()}


async def _sse(run: ConsensusRun, plan: Plan, model: str, include_usage: bool) -> AsyncIterator[bytes]:
    """OpenAI chunks: role, content, a finish chunk carrying `consensus`, optional usage, [DONE]."""
    top = head(new_id("chatcmpl" if plan.chat else "cmpl"), int(time.time()), model, plan.chat, chunk=True)
    usage_null = {"usage": None} if include_usage else {}

    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
        return sse({**top, "choices": [chunk_choice(plan.chat, 0, delta, finish)], **usage_null, **extra})

    if plan.chat:
        yield chunk({"role": "assistant", "content": ""})
    async for piece in run.pieces():
        yield chunk({"content": piece})
    yield chunk({}, run.finish_reason or "stop", consensus=run.report())
    if include_usage:
        yield sse({**top, "choices": [], "usage": run.usage()})
    yield SSE_DONE
