"""Run the prompt set at each concurrency level, bounded in request count and wall time.

A level is `requests` requests with at most `concurrency` in flight (closed loop: a worker sends
its next request when the previous one ends). The whole run has one wall-time budget; when it
runs out, in-flight requests are cancelled and recorded as `aborted`, so the tool always stops.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import httpx

from .client import ABORTED, TIMEOUT, RequestResult, endpoint_path, request_body, stream_request
from .prompts import make_completion_prompts, make_prompts

MAX_REQUESTS_PER_LEVEL = 1000
MAX_CONCURRENCY = 256
MAX_WALL_S = 3600.0


@dataclass
class BenchConfig:
    base_url: str
    model: str | None = None  # None: the first id from GET /v1/models
    endpoint: str = "completions"  # chat | completions
    concurrency: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    requests: int = 8  # per level
    max_tokens: int = 64
    seed: int = 0
    include_usage: bool = True  # ask for the usage chunk (servers that ignore it: events are counted)
    timeout_s: float = 120.0  # per request
    max_seconds: float = 600.0  # whole run
    warmup: int = 1  # untimed requests before the first level (loads the model, fills caches)
    label: str = ""
    extra_body: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if self.endpoint not in ("chat", "completions"):
            raise ValueError(f"endpoint must be chat or completions, not {self.endpoint!r}")
        if not self.concurrency or any(not 1 <= c <= MAX_CONCURRENCY for c in self.concurrency):
            raise ValueError(f"concurrency levels must be within 1..{MAX_CONCURRENCY}")
        if not 1 <= self.requests <= MAX_REQUESTS_PER_LEVEL:
            raise ValueError(f"requests per level must be within 1..{MAX_REQUESTS_PER_LEVEL}")
        if not 0 < self.max_seconds <= MAX_WALL_S:
            raise ValueError(f"max seconds must be within (0, {MAX_WALL_S:.0f}]")
        if self.max_tokens < 1 or self.timeout_s <= 0 or self.warmup < 0:
            raise ValueError("max tokens and timeout must be positive, warmup non-negative")


@dataclass
class LevelRun:
    concurrency: int
    planned: int
    wall_s: float
    results: list[RequestResult]  # started requests, in start order


def _bodies(cfg: BenchConfig, model: str) -> list[dict[str, Any]]:
    maker = make_prompts if cfg.endpoint == "chat" else make_completion_prompts
    prompts = maker(cfg.requests, cfg.seed)
    return [request_body(cfg.endpoint, model, p, cfg.max_tokens, cfg.seed + i, cfg.include_usage, cfg.extra_body)
            for i, p in enumerate(prompts)]


async def _timed(client: httpx.AsyncClient, url: str, body: dict[str, Any], res: RequestResult,
                 timeout_s: float, clock: Callable[[], float]) -> None:
    try:
        await asyncio.wait_for(stream_request(client, url, body, res, clock), timeout_s)
    except asyncio.TimeoutError:
        res.status, res.error = TIMEOUT, f"no complete answer within {timeout_s:g} s"


async def run_level(client: httpx.AsyncClient, url: str, bodies: list[dict[str, Any]], concurrency: int,
                    budget_s: float, timeout_s: float, clock: Callable[[], float] = time.perf_counter) -> LevelRun:
    """Send `bodies` with `concurrency` workers; stop at `budget_s` whatever is still running."""
    t0 = clock()
    results: list[RequestResult] = []
    pending = iter(range(len(bodies)))

    async def worker() -> None:
        for i in pending:  # shared iterator: each index is taken by exactly one worker
            res = RequestResult(index=i, start=clock() - t0)
            results.append(res)
            await _timed(client, url, bodies[i], res, timeout_s, clock)

    tasks = [asyncio.create_task(worker()) for _ in range(min(concurrency, len(bodies)))]
    _, late = await asyncio.wait(tasks, timeout=max(budget_s, 0.0))
    for task in late:
        task.cancel()
    await asyncio.gather(*late, return_exceptions=True)
    for res in results:
        if res.total is None:  # cancelled before its stream began
            res.total = clock() - t0 - res.start
        if res.status == ABORTED and res.error is None:
            res.error = "wall-time budget of the run exhausted"
    return LevelRun(concurrency, len(bodies), clock() - t0, results)


async def discover_model(client: httpx.AsyncClient, base_url: str) -> str:
    try:
        resp = await client.get(base_url + "/v1/models")
        resp.raise_for_status()
    except httpx.HTTPError as err:
        raise RuntimeError(f"cannot list models at {base_url}/v1/models: {err}") from err
    data = resp.json().get("data") or []
    if not data:
        raise RuntimeError(f"{base_url}/v1/models lists no model")
    return str(data[0]["id"])


async def run_bench(cfg: BenchConfig, clock: Callable[[], float] = time.perf_counter,
                    log: Callable[[str], None] = lambda _: None) -> tuple[str, list[LevelRun]]:
    """Warm up, then run every level in order within `cfg.max_seconds`; returns (model, levels)."""
    cfg.validate()
    base = cfg.base_url.rstrip("/")
    url = base + endpoint_path(cfg.endpoint)
    deadline = clock() + cfg.max_seconds
    limits = httpx.Limits(max_connections=max(cfg.concurrency) + 2, max_keepalive_connections=max(cfg.concurrency) + 2)
    timeout = httpx.Timeout(cfg.timeout_s, connect=10.0)
    async with httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False) as client:
        model = cfg.model or await discover_model(client, base)
        bodies = _bodies(cfg, model)
        for i in range(cfg.warmup):
            warm = RequestResult(index=-1 - i)
            await _timed(client, url, bodies[i % len(bodies)], warm, max(min(cfg.timeout_s, deadline - clock()), 0.001), clock)
            log(f"warmup {i + 1}/{cfg.warmup}: {warm.status} in {warm.total:.2f} s")
        levels = []
        for c in cfg.concurrency:
            budget = deadline - clock()
            if budget <= 0:
                log(f"concurrency {c}: skipped, wall-time budget exhausted")
                break
            level = await run_level(client, url, bodies, c, budget, cfg.timeout_s, clock)
            log(f"concurrency {c}: {sum(r.status == 'ok' for r in level.results)}/{level.planned} ok in {level.wall_s:.2f} s")
            levels.append(level)
    return model, levels
