"""HTTP layer: one FastAPI app per role, all sharing one `AppState` (api/state.py).

Modules: `protocol` (request schemas and the field rule), `requests` (request -> Plan), `routes`
(module-level routers), `responses` (the one response path and request accounting), `framing`
(OpenAI objects and SSE lines), `streaming` (EventStream, pings), `consensus` (the merged answer on
8084), `admin`, `ui`, `middleware` / `security` (the ASGI stack `wrap` builds).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..config import Role, ServerSettings
from ..errors import ApiError, BodyTooLarge, InvalidRequest, NotFound
from . import admin, embeddings, openai_responses, routes
from .responses import count_request, error_response
from .state import AppState


class BodyLimit:
    """413 for request bodies over the limit, whether or not Content-Length tells the truth."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for k, v in scope.get("headers", []):
            if k == b"content-length" and v.isdigit() and int(v) > self.limit:
                return await error_response(BodyTooLarge(self.limit))(scope, receive, send)
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge()
            return msg

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await error_response(BodyTooLarge(self.limit))(scope, receive, send)


class _TooLarge(Exception):
    pass


def _validation_error(exc: RequestValidationError) -> InvalidRequest:
    """The first validation error as OpenAI words it; `param` is always the top-level field."""
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    if first.get("type") == "json_invalid":
        return InvalidRequest("The request body is not valid JSON.")
    ctx = first.get("ctx") or {}
    if isinstance(ctx.get("param"), str):  # the field rule's refusals (api/protocol.py)
        return InvalidRequest(first.get("msg", "Invalid request."), param=ctx["param"])
    param = ".".join(loc) or None
    if first.get("type") == "extra_forbidden":
        return InvalidRequest(f"Unrecognized request argument supplied: {param}", param=loc[0] if loc else None)
    msg = str(first.get("msg", "Invalid request.")).removeprefix("Value error, ")
    return InvalidRequest(f"{msg}" + (f" (at '{param}')" if param else ""), param=loc[0] if loc else None)


def create_app(state: AppState, role: Role) -> FastAPI:
    """One role's app: the shared routers (capibara6/api/routes.py), admin, the web page, and the
    handlers that turn every error into OpenAI's shape (counted once, by count_request)."""
    app = FastAPI(title=f"capibara6 ({role})", docs_url=None, redoc_url=None)
    app.state.capibara6 = state
    app.state.role = role

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        count_request(request, None, exc.status)
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        body = exc.body
        model = body.get("model") if isinstance(body, dict) else None
        count_request(request, model if isinstance(model, str) and model in state.registry.models else None, 400)
        return error_response(_validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return error_response(NotFound("Unknown URL."))
        err = InvalidRequest(str(exc.detail))
        err.status = exc.status_code
        return error_response(err)

    for router in (routes.probes, routes.models, routes.completions, admin.router, openai_responses.router, embeddings.router):
        app.include_router(router)
    from .ui import mount_ui  # GET / and /ui/*: the built-in web page (capibara6/api/ui.py), unless --no-ui

    mount_ui(app, state, role)
    return app


def wrap(app: FastAPI, settings: ServerSettings, drain: Any = None) -> ASGIApp:
    """The ASGI stack, outermost first: request id + access log, CORS (if configured), drain gate
    (503 while shutting down), API key (if configured), body size limit, the app.
    `drain` (capibara6.shutdown.Drain) is shared by every role of one process."""
    from starlette.middleware.cors import CORSMiddleware

    from ..shutdown import Drain
    from .middleware import DrainGate, RequestContext
    from .security import ApiKeyAuth

    stack: ASGIApp = BodyLimit(app, settings.max_body_bytes)
    if settings.api_key:
        stack = ApiKeyAuth(stack, settings.api_key, settings.open_health)
    stack = DrainGate(stack, drain if drain is not None else Drain())
    if settings.cors_origins:
        stack = CORSMiddleware(
            stack, allow_origins=settings.cors_origins, allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type", "X-Request-ID"], expose_headers=["X-Request-ID"],
        )
    metrics = app.state.capibara6.pool.metrics
    return RequestContext(stack, app.state.role, settings.log_prompts, settings.max_body_bytes, metrics)


__all__ = ["AppState", "create_app", "wrap"]
