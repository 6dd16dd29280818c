"""A generation's call worked out from its prepared prompt: the request's limits applied, the
template's stops added. One function for both paths: the server runs it between `prepare` and
`generate` (in-process backends, tool runs), and a model worker runs it between the two itself
when the server sends both steps as one message (`WorkerBackend.prepare_generate`: one round trip
to the worker before the prefill instead of two)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..errors import InvalidRequest
from ..types import Prepared, SamplingParams


@dataclass(frozen=True)
class CallLimits:
    max_prompt_tokens: int
    max_tokens: int | None  # the request's; None: up to the context, at most max_tokens_cap
    max_tokens_cap: int


def finish_call(prepared: Prepared, params: SamplingParams, n_ctx: int, limits: CallLimits) -> SamplingParams:
    """`params` for `prepared`: its stops after the request's, `max_tokens` resolved. A prompt
    over `max_prompt_tokens` is a 400 naming `prompt`."""
    stops = tuple(params.stop) + tuple(s for s in prepared.stops if s not in params.stop)
    if prepared.n_tokens > limits.max_prompt_tokens:
        raise InvalidRequest(
            f"The prompt has {prepared.n_tokens} tokens; the limit is {limits.max_prompt_tokens}.", param="prompt"
        )
    room = n_ctx - prepared.n_tokens
    max_tokens = limits.max_tokens or max(1, min(limits.max_tokens_cap, room))
    return replace(params, max_tokens=max_tokens, stop=stops)
