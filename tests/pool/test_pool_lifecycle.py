"""The pool's lifecycle with the real llama.cpp backend, in process (real loads, real memory)."""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from capibara6.config import parse_registry
from capibara6.errors import ServiceUnavailable
from capibara6.pool import ModelPool
from capibara6.types import GenerationOutcome, SamplingParams
from tests.conftest import gemma_registry
from tests.fakes import prepared

MODEL = "gemma3-270m"


def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096


def pool_for(gemma_path: Path, **extra: Any) -> ModelPool:
    return ModelPool(parse_registry(gemma_registry(gemma_path, **extra)))


def counter(pool: ModelPool, name: str, **labels: str) -> float:
    return pool.metrics.registry.get_sample_value(name, labels) or 0.0


def generate(backend: Any, n: int, per_token_sleep: float = 0.0) -> int:
    tokens = prepared(backend, "Once upon a time")
    params = SamplingParams(max_tokens=n, temperature=0.0)
    count = 0
    for _ in backend.generate(tokens, params, GenerationOutcome(), threading.Event()):
        count += 1
        time.sleep(per_token_sleep)
    return count


async def wait_state(pool: ModelPool, mid: str, state: str, timeout: float) -> float:
    t0 = time.monotonic()
    while pool.status(mid) != state:
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"{mid} is {pool.status(mid)}, not {state}, after {timeout} s")
        await asyncio.sleep(0.05)
    return time.monotonic() - t0


def test_single_flight_real_load(gemma_path: Path) -> None:
    async def main() -> None:
        pool = pool_for(gemma_path)
        seen: list[int] = []

        async def one() -> None:
            async with pool.lease(MODEL) as backend:
                seen.append(id(backend))

        await asyncio.gather(*(one() for _ in range(5)))
        assert len(set(seen)) == 1 and len(seen) == 5
        assert counter(pool, "capibara6_model_loads_total", model=MODEL) == 1
        await pool.close()

    asyncio.run(main())


def resident(pool: ModelPool) -> int:
    """This process's RSS plus its model workers' (isolation: worker keeps the weights there)."""
    return rss_bytes() + sum(b for _, b in pool.rss_snapshot())


def test_idle_unload_frees_memory_and_a_long_stream_is_never_cut(gemma_path: Path) -> None:
    async def main() -> None:
        raw = gemma_registry(gemma_path)
        raw["defaults"]["idle_unload_s"] = 1.0
        pool = ModelPool(parse_registry(raw))
        before = rss_bytes()
        async with pool.lease(MODEL) as backend:
            # a stream that outlasts the idle timeout: ~2 s of tokens while the reaper runs
            t0 = time.monotonic()
            n = await asyncio.to_thread(generate, backend, 40, 0.05)
            assert time.monotonic() - t0 > 1.5 and n > 0
            assert pool.status(MODEL) == "busy" and pool.loaded(MODEL) is backend
        loaded = resident(pool)
        assert loaded - before > 150e6, (before, loaded)  # the 253 MB weights are resident
        assert pool.status(MODEL) == "ready"
        took = await wait_state(pool, MODEL, "unloaded", timeout=10)
        assert took >= 0.5  # the clock started when the lease ended, not at load
        after = resident(pool)
        assert loaded - after > 0.6 * (loaded - before), (before, loaded, after)
        assert counter(pool, "capibara6_model_unloads_total", model=MODEL, reason="idle") == 1
        async with pool.lease(MODEL) as backend:  # and it loads again on demand
            assert generate(backend, 2) > 0
        await pool.close()

    asyncio.run(main())


def test_lru_eviction_max_loaded_one_same_file_two_ids(gemma_path: Path) -> None:
    async def main() -> None:
        raw = gemma_registry(gemma_path, other={"source": {"path": str(gemma_path)}, "chat_format": "gemma"})
        raw["pool"]["max_loaded"] = 1
        pool = ModelPool(parse_registry(raw))
        async with pool.lease(MODEL) as a:
            assert generate(a, 2) > 0
        async with pool.lease("other") as b:
            assert pool.status(MODEL) == "unloaded" and pool.status("other") == "busy"
            assert generate(b, 2) > 0
        assert counter(pool, "capibara6_model_unloads_total", model=MODEL, reason="evicted") == 1
        await pool.close()

    asyncio.run(main())


def test_failed_load_then_good_load(gemma_path: Path, tmp_path: Path) -> None:
    async def main() -> None:
        target = tmp_path / "later.gguf"
        target.write_bytes(b"GGUF" + b"\x00" * 64)  # corrupt
        pool = pool_for(gemma_path, later={"source": {"path": str(target)}, "chat_format": "gemma"})
        with pytest.raises(ServiceUnavailable) as info:
            await pool.load("later")
        assert info.value.code == "model_unavailable" and pool.status("later") == "unloaded"
        async with pool.lease(MODEL) as backend:  # other models unaffected
            assert generate(backend, 2) > 0
        shutil.copyfile(gemma_path, target)  # the operator fixes the file
        assert await pool.load("later") == "ready"
        await pool.close()

    asyncio.run(main())
