"""OpenAI request objects -> the service's `Plan`: sampling fields, prompts, the stream mode.

Pure functions of the parsed request (capibara6/api/protocol.py has already applied the field
rule); nothing here touches the pool or HTTP.
"""

from __future__ import annotations

from typing import Any

from ..errors import InvalidRequest
from ..serving import Plan
from ..tool_use import tool_request
from ..types import SamplingParams
from .grammar import response_format_grammar
from .protocol import ChatCompletionRequest, ChatMessage, CompletionRequest

ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completions", "/v1/responses": "responses",
             "/v1/embeddings": "embeddings"}


def stream_default(role: str) -> bool:
    """`stream` absent: true on the streaming port (8083), false elsewhere. The one place it is decided."""
    return role == "streaming"


def sampling(req: ChatCompletionRequest | CompletionRequest, grammar: str | None) -> SamplingParams:
    return SamplingParams(
        temperature=req.temperature,
        top_p=req.top_p,
        top_k=req.top_k,
        min_p=req.min_p,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        repeat_penalty=req.repeat_penalty,
        seed=req.seed,
        stop=tuple(req.stop_list()),
        grammar=grammar,
        logit_bias=req.logit_bias_pairs(),
    )


def stream_mode(req: ChatCompletionRequest | CompletionRequest, default: bool) -> tuple[bool, bool]:
    """(stream, include_usage). `stream` absent takes the port's default (8083: true); then
    `stream_options` without a stream is a 400, as OpenAI answers."""
    stream = req.stream if req.stream is not None else default
    if req.stream_options is not None and not stream:
        raise InvalidRequest("The 'stream_options' parameter is only allowed when 'stream' is true.", param="stream_options")
    return stream, bool(req.stream_options and req.stream_options.include_usage)


def chat_message(m: ChatMessage) -> dict[str, Any]:
    """One message as the templates see it: role, text content, and the tool fields it has."""
    out: dict[str, Any] = {"role": m.role, "content": m.text()}
    if m.name:
        out["name"] = m.name
    if m.tool_calls:
        out["tool_calls"] = m.tool_calls
    if m.tool_call_id:
        out["tool_call_id"] = m.tool_call_id
    return out


def chat_plan(req: ChatCompletionRequest) -> tuple[Plan, bool]:
    messages = []
    for i, m in enumerate(req.messages):
        try:
            messages.append(chat_message(m))
        except ValueError as err:
            raise InvalidRequest(f"messages[{i}]: {err}", param="messages") from None
    want_lp = req.logprobs
    params = sampling(req, response_format_grammar(req.response_format))
    if want_lp:
        params = SamplingParams(**{**params.__dict__, "logprobs": req.top_logprobs or 0})
    tools = tool_request(req.tools, req.tool_choice, req.parallel_tool_calls)
    return Plan(req.model, True, [messages], req.n, req.token_limit(), params, tools=tools), want_lp


def completion_plan(req: CompletionRequest) -> tuple[Plan, bool]:
    try:
        prompts = req.prompts()
    except ValueError as err:
        raise InvalidRequest(str(err), param="prompt") from None
    params = sampling(req, response_format_grammar(req.response_format))
    want_lp = req.logprobs is not None
    if want_lp:
        params = SamplingParams(**{**params.__dict__, "logprobs": req.logprobs})
    return Plan(req.model, False, prompts, req.n, req.token_limit(), params, echo=req.echo), want_lp  # type: ignore[arg-type]
