"""One streaming request against an OpenAI-compatible server, timed per SSE event.

Raw httpx streaming rather than the openai SDK: the SDK buffers and parses, so the time a token
reached the client would be blurred. Here every `data:` line is stamped as it arrives.
A token event is an SSE chunk carrying non-empty text (chat `delta.content`, completions `text`);
the role-only chunk, finish chunk and usage chunk are not tokens.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import httpx

# Outcomes of one request; anything but "ok" counts as an error in the report.
OK, HTTP_ERROR, CUT, STREAM_ERROR, TIMEOUT, TRANSPORT, ABORTED = (
    "ok", "http_error", "cut", "stream_error", "timeout", "transport_error", "aborted",
)


@dataclass
class RequestResult:
    """What one request did. Times are seconds; `start` is relative to the level's start."""

    index: int
    start: float = 0.0
    status: str = ABORTED  # until the request finishes it counts as aborted (wall cap hit)
    http_status: int | None = None
    error: str | None = None
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    events: int = 0  # token-carrying SSE events seen
    usage_tokens: int | None = None  # completion_tokens from the usage chunk, when sent
    finish_reason: str | None = None
    done: bool = False  # saw `data: [DONE]`
    total: float | None = None

    @property
    def tokens(self) -> int:
        """Generated tokens: the server's usage count when it sent one, else counted events."""
        return self.usage_tokens if self.usage_tokens is not None else self.events

    @property
    def tok_s(self) -> float | None:
        """End-to-end output rate of this request (includes queueing and prefill)."""
        return self.tokens / self.total if self.total and self.tokens else None

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index, "start": self.start, "status": self.status, "http_status": self.http_status,
            "error": self.error, "ttft": self.ttft, "itl": self.itl, "events": self.events,
            "usage_tokens": self.usage_tokens, "tokens": self.tokens, "finish_reason": self.finish_reason,
            "done": self.done, "total": self.total, "tok_s": self.tok_s,
        }


def request_body(endpoint: str, model: str, prompt: str, max_tokens: int, seed: int,
                 include_usage: bool, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON body for one streaming request; greedy so contestants generate comparable text."""
    body: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "temperature": 0.0, "seed": seed, "stream": True}
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    return {**body, **(extra or {})}


def endpoint_path(endpoint: str) -> str:
    return "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"


def _event_text(obj: dict[str, Any]) -> str:
    out = []
    for choice in obj.get("choices") or []:
        if "delta" in choice:
            out.append((choice.get("delta") or {}).get("content") or "")
        else:
            out.append(choice.get("text") or "")
    return "".join(out)


def _finish(obj: dict[str, Any]) -> str | None:
    for choice in obj.get("choices") or []:
        if choice.get("finish_reason"):
            return str(choice["finish_reason"])
    return None


class _Timer:
    """Stamps token events: first one gives TTFT, later ones an inter-token latency each."""

    def __init__(self, res: RequestResult, t0: float, clock: Callable[[], float]) -> None:
        self.res, self.t0, self.clock = res, t0, clock
        self.last: float | None = None

    def token(self) -> None:
        now = self.clock()
        if self.last is None:
            self.res.ttft = now - self.t0
        else:
            self.res.itl.append(now - self.last)
        self.last = now
        self.res.events += 1


def _on_data(res: RequestResult, timer: _Timer, data: str) -> bool:
    """Handle one `data:` payload; True when the stream has said [DONE]."""
    if data == "[DONE]":
        res.done = True
        return True
    obj = json.loads(data)
    if "error" in obj and not obj.get("choices"):
        err = obj["error"]
        res.status, res.error = STREAM_ERROR, str(err.get("message") if isinstance(err, dict) else err)
        return False
    if _event_text(obj):
        timer.token()
    res.finish_reason = _finish(obj) or res.finish_reason
    usage = obj.get("usage")
    if isinstance(usage, dict) and usage.get("completion_tokens") is not None:
        res.usage_tokens = int(usage["completion_tokens"])
    return False


async def stream_request(client: httpx.AsyncClient, url: str, body: dict[str, Any], res: RequestResult,
                         clock: Callable[[], float] = time.perf_counter) -> RequestResult:
    """POST `body` to `url` and read its SSE stream into `res` (filled in place, so a caller that
    cancels this coroutine keeps what was measured so far)."""
    t0 = clock()
    timer = _Timer(res, t0, clock)
    res.status = ABORTED
    try:
        async with client.stream("POST", url, json=body) as resp:
            res.http_status = resp.status_code
            if resp.status_code != 200:
                raw = (await resp.aread()).decode(errors="replace")
                res.status, res.error = HTTP_ERROR, _error_message(raw)
                return res
            async for line in resp.aiter_lines():
                if line.startswith("data:") and _on_data(res, timer, line[5:].strip()):
                    break
        if res.status == ABORTED:  # no error event seen: judge the ending
            res.status = OK if res.done and res.finish_reason else CUT
            if res.status == CUT:
                res.error = "stream ended without [DONE]" if not res.done else "stream ended without finish_reason"
    except httpx.TimeoutException as err:
        res.status, res.error = TIMEOUT, f"{type(err).__name__}: {err}"
    except (httpx.HTTPError, json.JSONDecodeError) as err:
        res.status, res.error = TRANSPORT, f"{type(err).__name__}: {err}"
    finally:
        res.total = clock() - t0
    return res


def _error_message(raw: str) -> str:
    try:
        err = json.loads(raw).get("error", raw)
        return str(err.get("message", err) if isinstance(err, dict) else err)[:500]
    except (ValueError, AttributeError):
        return raw[:500]
