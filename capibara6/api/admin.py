"""Admin routes: load and unload models by hand, see the pool's lifecycle details.

`POST /admin/models/{id}/unload` on a model with leases (or a load in flight) answers 409
`model_busy` instead of waiting: an operator wants to know at once, and a wait could outlast any
client timeout while a long stream runs. Retry, or let idle unloading take it.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from ..errors import ModelNotFound

router = APIRouter(prefix="/admin", tags=["admin"])


def _pool(request: Request) -> Any:
    return request.app.state.capibara6.pool


def _known(request: Request, model_id: str) -> None:
    if model_id not in request.app.state.capibara6.registry.models:
        raise ModelNotFound(model_id)


@router.get("/models")
async def models(request: Request) -> dict[str, Any]:
    pool = _pool(request)
    return {"object": "list", "data": [pool.describe(mid) for mid in request.app.state.capibara6.registry.models]}


@router.post("/models/{model_id:path}/load")
async def load(model_id: str, request: Request) -> dict[str, Any]:
    """Load now (waits for the load; 503 with the reason if it fails)."""
    _known(request, model_id)
    pool = _pool(request)
    await pool.load(model_id)
    return pool.describe(model_id)


@router.post("/models/{model_id:path}/unload")
async def unload(model_id: str, request: Request) -> dict[str, Any]:
    """Unload now; 409 model_busy while it has leases. `unloaded` says whether it was loaded."""
    _known(request, model_id)
    pool = _pool(request)
    was_loaded = await pool.unload(model_id, "admin")
    return {**pool.describe(model_id), "unloaded": was_loaded}
