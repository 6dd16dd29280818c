"""HTTP layer: parse, dispatch, frame. One FastAPI app per role, all sharing one `AppState`."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Awaitable, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..config import Registry, Role, ServerSettings
from ..errors import ApiError, BodyTooLarge, InvalidRequest, ModelNotFound, NotFound
from ..metrics import CONTENT_TYPE
from ..orchestrator.routing import ensemble_cards
from ..pool import ModelPool
from ..serving import Generation, Plan, Service
from ..types import SamplingParams
from . import admin
from .framing import complete_json, stream_sse
from .grammar import response_format_grammar
from .protocol import ChatCompletionRequest, CompletionRequest
from .streaming import EventStream

T = TypeVar("T")


@dataclass
class AppState:
    """What every role's app shares in one process."""

    registry: Registry
    settings: ServerSettings
    pool: ModelPool
    service: Service
    ready: asyncio.Event = field(default_factory=asyncio.Event)

    @classmethod
    def create(cls, registry: Registry, settings: ServerSettings, pool: ModelPool | None = None) -> AppState:
        pool = pool or ModelPool(registry)
        return cls(registry, settings, pool, Service(registry, pool, settings))


def error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


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


def _set(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


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


def model_card(state: AppState, model_id: str) -> dict[str, Any]:
    spec = state.registry.models[model_id]
    return {
        "id": model_id,
        "object": "model",
        "created": 0,
        "owned_by": spec.owned_by,
        "status": state.pool.status(model_id),
        "backend": spec.backend,
        "n_ctx": spec.n_ctx,
        "tags": spec.tags,
        "description": spec.description,
    }


def _sampling(req: ChatCompletionRequest | CompletionRequest, grammar: str | None) -> SamplingParams:
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
    params = _sampling(req, response_format_grammar(req.response_format))
    if want_lp:
        params = SamplingParams(**{**params.__dict__, "logprobs": req.top_logprobs or 0})
    return Plan(req.model, True, [messages], req.n, req.token_limit(), params), want_lp


def completion_plan(req: CompletionRequest) -> tuple[Plan, bool]:
    try:
        prompts = req.prompts()
    except ValueError as err:
        raise InvalidRequest(str(err), param="prompt") from None
    params = _sampling(req, response_format_grammar(req.response_format))
    want_lp = req.logprobs is not None
    if want_lp:
        params = SamplingParams(**{**params.__dict__, "logprobs": req.logprobs})
    return Plan(req.model, False, prompts, req.n, req.token_limit(), params, echo=req.echo), want_lp  # type: ignore[arg-type]


def create_app(state: AppState, role: Role) -> FastAPI:
    app = FastAPI(title=f"capibara6 ({role})", docs_url=None, redoc_url=None)
    app.state.capibara6 = state
    app.state.role = role
    stream_default = role == "streaming"

    endpoint_by_path = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}

    def count_rejected(request: Request, status: int, body: Any = None) -> None:
        """requests_total for completion requests refused before `respond` counted them."""
        endpoint = endpoint_by_path.get(request.url.path)
        if endpoint is None or getattr(request.state, "counted", False):
            return
        model = body.get("model") if isinstance(body, dict) else None
        label = model if isinstance(model, str) and model in state.registry.models else "_unknown"
        state.pool.metrics.requests.labels(label, role, endpoint, str(status)).inc()

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        count_rejected(request, exc.status)
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        count_rejected(request, 400, exc.body)
        return error_response(_validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return error_response(NotFound("Unknown URL."))
        err = InvalidRequest(str(exc.detail))
        err.status = exc.status_code
        return error_response(err)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.pool.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> Response:
        from ..readiness import shared_probe  # one probe (and cache) per pool: see readiness.py

        if not state.ready.is_set():
            return JSONResponse({"status": "warming_up"}, status_code=503)
        v = await shared_probe(state.pool, state.registry).check()
        body = {"status": "ready" if v.ok else "not_ready", "model": v.model, "reason": v.reason}
        return JSONResponse(body, status_code=200 if v.ok else 503)

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        data = [model_card(state, mid) for mid in state.registry.models]
        if role == "consensus":
            data += ensemble_cards(state.registry)
        return {"object": "list", "data": data}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> dict[str, Any]:
        if role == "consensus" and model_id not in state.registry.models:
            for card in ensemble_cards(state.registry):
                if card["id"] == model_id:
                    return card
        if model_id not in state.registry.models:
            raise ModelNotFound(model_id)
        return model_card(state, model_id)

    async def respond(request: Request, plan: Plan, want_lp: bool, stream: bool, include_usage: bool) -> Response:
        endpoint = "chat" if plan.chat else "completions"
        status = 500
        try:
            response = await _respond(request, plan, want_lp, stream, include_usage)
            status = response.status_code
            return response
        except ApiError as err:
            status = err.status
            raise
        except asyncio.CancelledError:
            status = 499  # client closed the request
            raise
        finally:
            label = plan.model if plan.model in state.registry.models else "_unknown"
            state.pool.metrics.requests.labels(label, role, endpoint, str(status)).inc()
            request.state.counted = True

    async def _respond(request: Request, plan: Plan, want_lp: bool, stream: bool, include_usage: bool) -> Response:
        state.service.check_limits(plan.model, plan.n, plan.max_tokens, plan.params.stop)
        gen = state.service.generation(plan)
        if not stream:
            async def run() -> dict[str, Any]:
                async with gen:
                    await gen.start()
                    return await complete_json(gen, want_lp)

            return JSONResponse(await until_disconnect(request, run()))
        return await open_stream(gen, want_lp, include_usage)

    async def open_stream(gen: Generation, want_lp: bool, include_usage: bool) -> Response:
        """The headers go out as soon as the request has to wait (queue, load) or its prompt is
        accepted (before the prefill), whichever comes first. Everything decided before that
        (QueueFull at enqueue, shutting down, a prompt over the context) is still a plain JSON
        error with its status; what fails later is told in the stream (framing.sse_error)."""
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
        return EventStream(opening, stream_sse(gen, want_lp, include_usage), gen.aclose, state.settings.sse_ping_s)

    if role == "consensus":  # registered first, so these routes take precedence over the two below
        from .consensus import add_consensus_routes

        add_consensus_routes(app, state, respond)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest, request: Request) -> Response:
        plan, want_lp = chat_plan(req)
        stream, include_usage = stream_mode(req, stream_default)
        return await respond(request, plan, want_lp, stream, include_usage)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Response:
        plan, want_lp = completion_plan(req)
        stream, include_usage = stream_mode(req, stream_default)
        return await respond(request, plan, want_lp, stream, include_usage)

    app.include_router(admin.router)
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
