"""The built-in web page: `GET /` and its three assets under `/ui/`, plus `/ui/api/summary`.

    GET /                  capibara6/ui/index.html (chat playground, pool, metrics, consensus)
    GET /ui/app.js         the page's script; GET /ui/style.css its styles
    GET /ui/api/summary    running/waiting gauges, token counters, latency histograms and the
                           pool, read from the process's own metrics (the page needs no Prometheus)

Everything is served from files in the package, read once at mount: no CDN, no build step, works
on an air-gapped VM. The page talks to the server it came from only (same origin, `connect-src
'self'`), with the OpenAI routes and the admin routes a client would use. It is behind the API
key like every other route (capibara6/api/security.py); the key lives in the browser tab only.
`--no-ui` (ServerSettings.ui) mounts nothing, so `/` is a plain 404.

The Content-Security-Policy allows scripts, styles and connections from this origin only and no
inline script at all; the page itself never turns model text into HTML (it builds DOM nodes with
textContent), so a `<script>` in a model's answer is shown, never run.
"""

from __future__ import annotations

import math
import time
from importlib import resources
from typing import Any, Iterable

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response

from ..errors import NotFound

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
PAGE_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
ASSETS = {  # the only files served: a fixed list, so no path from a request reaches the disk
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
# histograms the page charts: summary key -> metric family name (capibara6/metrics.py)
HISTOGRAMS = {
    "ttft": "capibara6_time_to_first_token_seconds",
    "itl": "capibara6_inter_token_latency_seconds",
    "e2e": "capibara6_e2e_request_latency_seconds",
    "queue": "capibara6_request_queue_time_seconds",
}


def read_assets() -> dict[str, bytes]:
    folder = resources.files("capibara6") / "ui"
    return {name: (folder / name).read_bytes() for name in ASSETS}


def summarize(families: Iterable[Any]) -> dict[str, Any]:
    """The metrics the page shows, from prometheus_client metric families (`registry.collect()`).

    Histograms are summed over models and given as cumulative bucket counts (`le`, `counts`),
    so the page can take percentiles over any window by subtracting two snapshots."""
    gauges = {"capibara6_num_requests_running": "running", "capibara6_num_requests_waiting": "waiting",
              "capibara6_models_loaded": "models_loaded"}
    counters = {"capibara6_generation_tokens_total": "generation_tokens", "capibara6_prompt_tokens_total": "prompt_tokens",
                "capibara6_requests_total": "requests"}
    by_name = {v: k for k, v in HISTOGRAMS.items()}
    out: dict[str, Any] = {v: 0.0 for v in [*gauges.values(), *counters.values()]}
    hist: dict[str, dict[str, Any]] = {}
    for fam in families:
        for s in fam.samples:
            if s.name in gauges:
                out[gauges[s.name]] += s.value
            elif s.name in counters:
                out[counters[s.name]] += s.value
            elif fam.name in by_name and s.name.startswith(fam.name):
                h = hist.setdefault(by_name[fam.name], {"buckets": {}, "count": 0.0, "sum": 0.0})
                if s.name.endswith("_bucket"):
                    le = float(s.labels["le"])
                    h["buckets"][le] = h["buckets"].get(le, 0.0) + s.value
                elif s.name.endswith("_count"):
                    h["count"] += s.value
                elif s.name.endswith("_sum"):
                    h["sum"] += s.value
    out["histograms"] = {}
    for key in HISTOGRAMS:
        h = hist.get(key, {"buckets": {}, "count": 0.0, "sum": 0.0})
        les = sorted(b for b in h["buckets"] if math.isfinite(b))
        out["histograms"][key] = {"le": les, "counts": [h["buckets"][b] for b in les], "count": h["count"], "sum": h["sum"]}
    return out


def mount_ui(app: FastAPI, state: Any, role: str) -> None:
    """Add the page's routes to one role's app (nothing when `--no-ui`)."""
    if not state.settings.ui:
        return
    assets = read_assets()

    def asset(name: str) -> Response:
        return Response(assets[name], media_type=ASSETS[name], headers=PAGE_HEADERS)

    @app.get("/", include_in_schema=False)
    async def page() -> Response:
        return asset("index.html")

    @app.get("/ui/api/summary", include_in_schema=False)
    async def summary() -> JSONResponse:
        body = summarize(state.pool.metrics.registry.collect())
        pool = []
        for mid, spec in state.registry.models.items():
            pool.append({**state.pool.describe(mid), "backend": spec.backend, "parallel": spec.parallel, "n_ctx": spec.n_ctx})
        s = state.settings
        body.update(time=time.time(), role=role, pool=pool, consensus_port=s.ports.get("consensus"),
                    ensembles=sorted(state.registry.ensembles))
        return JSONResponse(body, headers={"Cache-Control": "no-store"})

    @app.get("/ui/{name}", include_in_schema=False)
    async def ui_file(name: str) -> Response:
        if name not in ASSETS:
            raise NotFound("Unknown URL.")
        return asset(name)


__all__ = ["CSP", "mount_ui", "read_assets", "summarize"]
