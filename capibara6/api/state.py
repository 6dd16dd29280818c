"""What every role's app shares in one process, and how a route finds it."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from fastapi import Request

from ..config import Registry, Role, ServerSettings
from ..pool import ModelPool
from ..serving import Service


@dataclass
class AppState:
    """The registry, settings, pool and service of this process (one for all three roles)."""

    registry: Registry
    settings: ServerSettings
    pool: ModelPool
    service: Service
    ready: asyncio.Event = field(default_factory=asyncio.Event)

    @classmethod
    def create(cls, registry: Registry, settings: ServerSettings, pool: ModelPool | None = None) -> AppState:
        pool = pool or ModelPool(registry)
        return cls(registry, settings, pool, Service(registry, pool, settings))


def app_state(request: Request) -> AppState:
    """The process state behind the app serving `request` (set by create_app)."""
    state: AppState = request.app.state.capibara6
    return state


def app_role(request: Request) -> Role:
    """The role (standard | streaming | consensus) of the app serving `request`."""
    role: Role = request.app.state.role
    return role


__all__ = ["AppState", "app_role", "app_state"]
