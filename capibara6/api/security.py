"""API key check (OpenAI style `Authorization: Bearer <key>`), as pure ASGI middleware.

Off when no key is configured. When on, every path needs the key except `/health`, `/ready` and
`/metrics` while `open_health` is true (probes and Prometheus scrape without secrets), and the web
page's static files (`/` and `/ui/<file>`: they hold no data, and a browser cannot attach a Bearer
header to a page load; everything the page then fetches, `/ui/api/*` included, needs the key, which
the page asks for once). The key is compared in constant time; CORS preflights pass (browsers send
no credentials on OPTIONS).
"""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from ..errors import Unauthorized
from .middleware import REJECTED, send_error

OPEN_PATHS = frozenset({"/health", "/ready", "/metrics"})
PAGE_PATHS = frozenset({"/", "/ui/index.html", "/ui/app.js", "/ui/style.css"})  # static, no data


def bearer_token(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    for k, v in headers:
        if k == b"authorization":
            scheme, _, token = v.partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                return token.strip()
            return None
    return None


def key_matches(given: bytes | None, expected: bytes) -> bool:
    # compare_digest on equal-type bytes: time depends on length only, never on where they differ
    return given is not None and hmac.compare_digest(given, expected)


class ApiKeyAuth:
    def __init__(self, app: ASGIApp, api_key: str, open_health: bool = True) -> None:
        self.app = app
        self.key = api_key.encode("utf-8")
        self.open = OPEN_PATHS if open_health else frozenset()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.open or scope["method"] == "OPTIONS" or (
            scope["method"] == "GET" and scope["path"] in PAGE_PATHS
        ):
            return await self.app(scope, receive, send)
        if key_matches(bearer_token(scope.get("headers", [])), self.key):
            return await self.app(scope, receive, send)
        err = Unauthorized()
        err.headers = {"WWW-Authenticate": "Bearer"}
        scope[REJECTED] = "unauthorized"
        await send_error(err, scope, receive, send)


__all__ = ["OPEN_PATHS", "PAGE_PATHS", "ApiKeyAuth", "bearer_token", "key_matches"]
