"""OpenAI response objects and SSE framing, built from the service's neutral events."""

from __future__ import annotations

import json
from typing import Any, AsyncIterator

from ..errors import ApiError
from ..serving import ChoiceEnd, Delta, Generation
from ..tool_use import ToolRun
from . import answers

SSE_DONE = b"data: [DONE]\n\n"


def sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


def sse_error(err: ApiError) -> bytes:
    """An error once the headers are out: `data: {"error": {...}}`, which OpenAI's SDKs raise."""
    return sse(err.body())


def _utf8(s: str) -> list[int]:
    return list(s.encode("utf-8"))


def chat_logprobs(deltas: list[Delta]) -> dict[str, Any]:
    content = []
    for d in deltas:
        ev = d.event
        if ev is None or ev.logprob is None:
            continue
        tok = ev.piece if ev.piece is not None else ev.text
        top = [{"token": t, "logprob": lp, "bytes": _utf8(t)} for t, lp in (ev.top_logprobs or {}).items()]
        content.append({"token": tok, "logprob": ev.logprob, "bytes": _utf8(tok), "top_logprobs": top})
    return {"content": content, "refusal": None}


def completion_logprobs(deltas: list[Delta], offset0: int = 0) -> dict[str, Any]:
    tokens: list[str] = []
    lps: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []
    pos = offset0
    for d in deltas:
        ev = d.event
        if ev is None or ev.logprob is None:
            continue
        tok = ev.piece if ev.piece is not None else ev.text
        tokens.append(tok)
        lps.append(ev.logprob)
        tops.append(ev.top_logprobs or {})
        offsets.append(pos)
        pos += len(tok)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def head(run_id: str, created: int, model: str, chat: bool, chunk: bool) -> dict[str, Any]:
    """The fields every (chat) completion object and chunk starts with."""
    obj = ("chat.completion.chunk" if chunk else "chat.completion") if chat else "text_completion"
    return {"id": run_id, "object": obj, "created": created, "model": model, "system_fingerprint": "capibara6"}


def final_choice(chat: bool, index: int, text: str, logprobs: Any, finish: str | None, run: ToolRun | None = None) -> dict[str, Any]:
    """One choice of a complete (non-streamed) response (chat: tool calls and thinking read out)."""
    if chat:
        msg = answers.message(text, run)
        return {"index": index, "message": msg, "logprobs": logprobs,
                "finish_reason": answers.finish_reason(finish, len(msg.get("tool_calls") or ()))}
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}


def chunk_choice(chat: bool, index: int, delta: dict[str, Any], finish: str | None = None, logprobs: Any = None) -> dict[str, Any]:
    """One choice of a stream chunk (chat: a delta; completions: its text)."""
    if chat:
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
    return {"index": index, "text": delta.get("content", ""), "logprobs": logprobs, "finish_reason": finish}


def _head(gen: Generation, chunk: bool) -> dict[str, Any]:
    return head(gen.id, gen.created, gen.plan.model, gen.plan.chat, chunk)


async def complete_json(gen: Generation, want_logprobs: bool) -> dict[str, Any]:
    """Drain the generation into one (chat) completion object."""
    texts: dict[int, list[str]] = {}
    deltas: dict[int, list[Delta]] = {}
    ends: dict[int, str | None] = {}
    async for ev in gen.events():
        if isinstance(ev, Delta):
            texts.setdefault(ev.index, []).append(ev.text)
            if not ev.echo:
                deltas.setdefault(ev.index, []).append(ev)
        else:
            ends[ev.index] = ev.finish_reason
    choices = []
    chat = gen.plan.chat
    for index in sorted(ends):
        ds = deltas.get(index, [])
        lp = (chat_logprobs(ds) if chat else completion_logprobs(ds)) if want_logprobs else None
        choices.append(final_choice(chat, index, "".join(texts.get(index, [])), lp, ends[index], gen.tool_run))
    return {**_head(gen, False), "choices": choices, "usage": gen.usage.as_dict()}


async def stream_sse(gen: Generation, want_logprobs: bool, include_usage: bool) -> AsyncIterator[bytes]:
    """OpenAI's SSE: a role chunk, a chunk per token, a finish chunk, optional usage, [DONE]."""
    top = _head(gen, True)
    usage_null = {"usage": None} if include_usage else {}
    shapers: dict[int, answers.Shaper] = {}

    def chunk(index: int, delta: dict[str, Any], finish: str | None = None, logprobs: Any = None) -> bytes:
        return sse({**top, "choices": [chunk_choice(gen.plan.chat, index, delta, finish, logprobs)], **usage_null})

    async for ev in gen.events():
        shaper = shapers.get(ev.index)
        if gen.plan.chat and shaper is None:
            shaper = shapers[ev.index] = answers.Shaper(gen.tool_run)
            yield chunk(ev.index, {"role": "assistant", "content": ""})
        if isinstance(ev, ChoiceEnd):
            for delta in shaper.finish() if shaper is not None else ():
                yield chunk(ev.index, delta)
            yield chunk(ev.index, {}, answers.finish_reason(ev.finish_reason, shaper.calls if shaper else 0))
            continue
        has_lp = want_logprobs and ev.event is not None and ev.event.logprob is not None
        lp = None
        if has_lp:
            lp = chat_logprobs([ev]) if gen.plan.chat else completion_logprobs([ev])
        if shaper is None or shaper.plain:
            if ev.text or has_lp:  # else held back (possible stop string) or an empty piece
                yield chunk(ev.index, {"content": ev.text}, None, lp)
            continue
        deltas = shaper.feed(ev.text) if ev.text else []
        if not deltas and has_lp:
            deltas = [{}]  # the token's logprobs go out even while its text is held back
        for k, delta in enumerate(deltas):
            yield chunk(ev.index, delta, None, lp if k == 0 else None)
    if include_usage:
        yield sse({**top, "choices": [], "usage": gen.usage.as_dict()})
    yield SSE_DONE
