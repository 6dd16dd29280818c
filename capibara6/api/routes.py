"""The OpenAI routes and the probes, as module-level routers (one route per path, every role).

The role of the app a request reached decides the few things that differ between ports: the
stream default (8083 streams when `stream` is absent), ensembles in /v1/models and a consensus
answer (8084). Everything else is the same code on all three ports.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from ..errors import ModelNotFound
from ..metrics import CONTENT_TYPE
from ..orchestrator.routing import ensemble_cards
from .consensus import consensus_response
from .protocol import ChatCompletionRequest, CompletionRequest
from .requests import chat_plan, completion_plan, stream_default, stream_mode
from .responses import respond
from .state import AppState, app_role, app_state

probes = APIRouter()
models = APIRouter()
completions = APIRouter()


@probes.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(app_state(request).pool.metrics.render(), media_type=CONTENT_TYPE)


@probes.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@probes.get("/ready")
async def ready(request: Request) -> Response:
    from ..readiness import shared_probe  # one probe (and cache) per pool: see readiness.py

    state = app_state(request)
    if not state.ready.is_set():
        return JSONResponse({"status": "warming_up"}, status_code=503)
    v = await shared_probe(state.pool, state.registry).check()
    body = {"status": "ready" if v.ok else "not_ready", "model": v.model, "reason": v.reason}
    return JSONResponse(body, status_code=200 if v.ok else 503)


def model_card(state: AppState, model_id: str) -> dict[str, Any]:
    """OpenAI's model object plus `status`, and `crash_reason` while the model's worker last died
    (cleared when it loads again)."""
    spec = state.registry.models[model_id]
    crashed = state.pool.describe(model_id).get("crash_reason")
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
        **({"crash_reason": crashed} if crashed else {}),
    }


@models.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    state = app_state(request)
    data = [model_card(state, mid) for mid in state.registry.models]
    if app_role(request) == "consensus":
        data += ensemble_cards(state.registry)
    return {"object": "list", "data": data}


@models.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> dict[str, Any]:
    state = app_state(request)
    if app_role(request) == "consensus" and model_id not in state.registry.models:
        for card in ensemble_cards(state.registry):
            if card["id"] == model_id:
                return card
    if model_id not in state.registry.models:
        raise ModelNotFound(model_id)
    return model_card(state, model_id)


async def _serve(request: Request, req: ChatCompletionRequest | CompletionRequest, plan: Any, want_lp: bool) -> Response:
    role = app_role(request)
    if role == "consensus":
        merged = await consensus_response(request, req, plan, want_lp)
        if merged is not None:
            return merged
    stream, include_usage = stream_mode(req, stream_default(role))
    return await respond(request, plan, want_lp, stream, include_usage)


@completions.post("/v1/chat/completions")
async def chat(req: ChatCompletionRequest, request: Request) -> Response:
    plan, want_lp = chat_plan(req)
    return await _serve(request, req, plan, want_lp)


@completions.post("/v1/completions")
async def completion(req: CompletionRequest, request: Request) -> Response:
    plan, want_lp = completion_plan(req)
    return await _serve(request, req, plan, want_lp)


__all__ = ["completions", "model_card", "models", "probes"]
