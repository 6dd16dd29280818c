"""OpenAI request objects -> the service's `Plan`: sampling fields, prompts, the stream mode.

Pure functions of the parsed request (capibara6/api/protocol.py has already applied the field
rule); nothing here touches the pool or HTTP.
"""

from __future__ import annotations

from ..errors import InvalidRequest
from ..serving import Plan
from ..types import SamplingParams
from .grammar import response_format_grammar
from .protocol import ChatCompletionRequest, CompletionRequest

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


def chat_plan(req: ChatCompletionRequest) -> tuple[Plan, bool]:
    try:
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
    except ValueError as err:
        raise InvalidRequest(str(err), param="messages") from None
    want_lp = req.logprobs
    params = sampling(req, response_format_grammar(req.response_format))
    if want_lp:
        params = SamplingParams(**{**params.__dict__, "logprobs": req.top_logprobs or 0})
    return Plan(req.model, True, [messages], req.n, req.token_limit(), params), want_lp


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
