"""Pure ASGI middleware (never BaseHTTPMiddleware: that would buffer SSE streams).

    RequestContext   request id (X-Request-ID in and out, on every response), one JSON access
                     log line per request (status, duration_ms, model; prompt only if log_prompts)
    DrainGate        while shutting down: 503 `shutting_down` for new requests; counts in-flight
                     requests for the drain (capibara6/shutdown.py)
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sys
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import ApiError, ServiceUnavailable
from ..logs import request_id_var
from ..shutdown import Drain

log = logging.getLogger("capibara6.access")

_SANE_ID = re.compile(rb"^[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}$")
_MODEL = re.compile(rb'"model"\s*:\s*"([^"\\]{1,200})"')
_UNTRACKED = frozenset({"/health", "/metrics"})  # answer during a drain, never wait for one
_SNIFF_BYTES = 4096  # the model id is near the start of every body clients send
REJECTED = "capibara6.rejected"  # scope key: why a middleware refused the request (metrics)


async def send_error(err: ApiError, scope: Scope, receive: Receive, send: Send) -> None:
    """An OpenAI-shaped error response straight from middleware."""
    body = json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def request_id(headers: list[tuple[bytes, bytes]]) -> str:
    """The client's X-Request-ID when it is short and plain (no header injection), else a new one."""
    for k, v in headers:
        if k == b"x-request-id" and _SANE_ID.match(v):
            return v.decode("ascii")
    return uuid.uuid4().hex


def _prompt_of(body: bytes) -> Any:
    try:
        data = json.loads(body)
    except ValueError:
        return None
    return data.get("messages", data.get("prompt")) if isinstance(data, dict) else None


class RequestContext:
    """Outermost layer: sees every response, including 401/413/503 made by inner middleware."""

    def __init__(
        self, app: ASGIApp, role: str, log_prompts: bool = False, max_body_bytes: int = 1 << 20, metrics: Any = None
    ) -> None:
        self.app = app
        self.role = role
        self.metrics = metrics
        self.log_prompts = log_prompts
        self.keep = max_body_bytes if log_prompts else _SNIFF_BYTES

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = request_id(scope.get("headers", []))
        token = request_id_var.set(rid)
        t0 = time.monotonic()
        status = 0
        head = bytearray()

        async def recv() -> Message:
            msg = await receive()
            if msg["type"] == "http.request" and len(head) < self.keep:
                head.extend(msg.get("body", b"")[: self.keep - len(head)])
            return msg

        async def send_with_id(msg: Message) -> None:
            nonlocal status
            if msg["type"] == "http.response.start":
                status = msg["status"]
                msg = {**msg, "headers": [*msg.get("headers", []), (b"x-request-id", rid.encode())]}
            await send(msg)

        try:
            await self.app(scope, recv, send_with_id)
        finally:
            self._log(scope, rid, status, t0, bytes(head))
            self._count_rejection(scope, status)
            request_id_var.reset(token)

    def _count_rejection(self, scope: Scope, status: int) -> None:
        """Refusals made by middleware never reach the handler that counts requests_total."""
        reason = scope.get(REJECTED) or ("too_large" if status == 413 else None)
        if reason and self.metrics is not None:
            self.metrics.rejected.labels(self.role, reason).inc()

    def _log(self, scope: Scope, rid: str, status: int, t0: float, head: bytes) -> None:
        if scope["path"] in _UNTRACKED or scope["path"] == "/ready":
            level = logging.DEBUG  # probes and scrapes every few seconds: not worth a line each
        else:
            level = logging.INFO if 0 < status < 500 else logging.WARNING
        if not log.isEnabledFor(level):
            return
        fields: dict[str, Any] = {
            "request_id": rid,
            "role": self.role,
            "method": scope["method"],
            "path": scope["path"],
            "status": status or 499,  # 0: the client left before any response (nginx's 499)
            "duration_ms": round((time.monotonic() - t0) * 1000, 1),
        }
        m = _MODEL.search(head)
        if m:
            fields["model"] = m.group(1).decode("utf-8", "replace")
        if self.log_prompts and head:
            fields["prompt"] = _prompt_of(head)
        log.log(level, "request", extra={"fields": fields})


class DrainGate:
    """503 while draining; otherwise registers the request as in flight for its whole life."""

    def __init__(self, app: ASGIApp, drain: Drain) -> None:
        self.app = app
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in _UNTRACKED:
            return await self.app(scope, receive, send)
        if self.drain.draining:
            err = ServiceUnavailable("The server is shutting down; retry on another instance.", code="shutting_down")
            err.headers = {"Connection": "close"}
            scope[REJECTED] = "shutting_down"
            return await send_error(err, scope, receive, send)
        if scope["path"] == "/ready":
            return await self.app(scope, receive, send)
        started = complete = False
        sse = False

        async def watched(msg: Message) -> None:
            nonlocal started, complete, sse
            if msg["type"] == "http.response.start":
                started = True
                sse = any(k == b"content-type" and v.startswith(b"text/event-stream") for k, v in msg.get("headers", []))
            elif msg["type"] == "http.response.body" and not msg.get("more_body", False):
                complete = True
            await send(msg)

        with self.drain.track():
            try:
                await self.app(scope, receive, watched)
            except asyncio.CancelledError:
                if not self.drain.cancelling:
                    raise
                task = asyncio.current_task()
                if task is not None and sys.version_info >= (3, 11):  # 3.10 keeps no cancel count
                    task.uncancel()  # we handled the drain's cancel: end the response cleanly
                await self._end_cancelled(scope, receive, send, started, complete, sse)

    @staticmethod
    async def _end_cancelled(scope: Scope, receive: Receive, send: Send, started: bool, complete: bool, sse: bool) -> None:
        """The grace period ran out: tell the client why, in the response's own format."""
        err = ServiceUnavailable("The server shut down before the generation finished.", code="shutting_down")
        if not started:
            return await send_error(err, scope, receive, send)
        if complete:
            return
        tail = b"data: " + json.dumps(err.body()).encode() + b"\n\n" if sse else b""
        await send({"type": "http.response.body", "body": tail, "more_body": False})


__all__ = ["REJECTED", "DrainGate", "RequestContext", "request_id", "send_error"]
