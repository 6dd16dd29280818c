"""/ready: a tiny generation proves readiness, cheaply (cache, single flight, never behind inference)."""

from __future__ import annotations

import asyncio
import threading
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import httpx
import pytest

from capibara6.readiness import ReadinessProbe
from capibara6.types import GenerationOutcome, SamplingParams, TokenEvent
from tests.conftest import gemma_registry
from tests.fakes import FakeBackendBase
from tests.serverproc import ServerProcess


class _Backend(FakeBackendBase):
    def __init__(self, fail: bool) -> None:
        self.fail = fail

    def tokenize(self, text: str, *, add_bos: bool = True) -> list[int]:
        return [1, 2]

    def generate(self, prompt: Any, params: SamplingParams, outcome: GenerationOutcome, cancel: threading.Event) -> Iterator[TokenEvent]:
        if self.fail:
            raise RuntimeError("backend exploded")
        assert params.max_tokens == 1
        yield TokenEvent(3, "x")


class ScriptedPool:
    """A seam: status and lease behaviour set by the test."""

    def __init__(self, status: str = "ready", fail: bool = False, hold: asyncio.Event | None = None) -> None:
        self.state = status
        self.fail = fail
        self.hold = hold
        self.leases = 0

    def status(self, model: str) -> str:
        return self.state

    @asynccontextmanager
    async def lease(self, model: str, touch: bool = True) -> AsyncIterator[_Backend]:
        self.leases += 1
        if self.hold is not None:
            await self.hold.wait()
        yield _Backend(self.fail)


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_generates_once_then_serves_from_cache() -> None:
    async def run() -> None:
        pool, clock = ScriptedPool(), Clock()
        probe = ReadinessProbe(pool, "m", ttl_s=5, clock=clock)
        results = await asyncio.gather(*(probe.check() for _ in range(5)))  # single flight
        assert all(v.ok and v.reason == "generated" for v in results) and pool.leases == 1
        clock.t = 4.9
        assert (await probe.check()).ok and pool.leases == 1
        clock.t = 5.1
        assert (await probe.check()).ok and pool.leases == 2

    asyncio.run(run())


def test_busy_model_is_ready_without_queueing() -> None:
    async def run() -> None:
        pool = ScriptedPool(status="busy")
        v = await ReadinessProbe(pool, "m").check()
        assert v.ok and v.reason == "busy" and pool.leases == 0

    asyncio.run(run())


def test_failure_is_not_ready_with_reason_and_retried_soon() -> None:
    async def run() -> None:
        pool, clock = ScriptedPool(fail=True), Clock()
        probe = ReadinessProbe(pool, "m", fail_ttl_s=1, clock=clock)
        v = await probe.check()
        assert not v.ok and "backend exploded" in v.reason
        pool.fail = False
        assert not (await probe.check()).ok and pool.leases == 1  # cached failure
        clock.t = 1.5
        assert (await probe.check()).ok and pool.leases == 2

    asyncio.run(run())


def test_deadline_bounds_the_wait_and_busy_counts() -> None:
    async def run() -> None:
        hold = asyncio.Event()
        pool = ScriptedPool(hold=hold)
        probe = ReadinessProbe(pool, "m", deadline_s=0.2)
        v = await probe.check()
        assert not v.ok and v.reason.startswith("timeout")
        pool.state = "busy"  # a real request holds the model: busy generating is proof enough
        v = await probe.check()
        assert v.ok and v.reason == "busy" and pool.leases == 1
        pool.state = "ready"
        hold.set()  # the first probe (never cancelled) finishes and its verdict is cached
        await asyncio.sleep(0.05)
        v = await probe.check()
        assert v.ok and v.reason == "generated" and pool.leases == 1

    asyncio.run(run())


def test_idle_unloaded_model_is_not_reloaded_by_probes() -> None:
    async def run() -> None:
        pool, clock = ScriptedPool(status="unloaded"), Clock()
        probe = ReadinessProbe(pool, "m", ttl_s=5, clock=clock)
        assert (await probe.check()).reason == "generated" and pool.leases == 1  # first: must prove it loads
        clock.t = 10
        v = await probe.check()
        assert v.ok and v.reason == "idle_unloaded" and pool.leases == 1

    asyncio.run(run())


@pytest.fixture(scope="module")
def broken_first(gemma_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("ready")
    bad = tmp / "corrupt.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    registry = gemma_registry(gemma_path)
    registry["models"] = {"broken": {"source": {"path": str(bad)}, "chat_format": "gemma"}, **registry["models"]}
    proc = ServerProcess(registry, tmp).wait_healthy()
    yield proc
    proc.stop()


def test_ready_is_503_when_the_model_cannot_generate(broken_first: ServerProcess) -> None:
    r = httpx.get(broken_first.url["standard"] + "/ready", timeout=60)
    assert r.status_code == 503
    body = r.json()
    assert body["status"] == "not_ready" and body["model"] == "broken" and body["reason"].startswith("failed")
    assert httpx.get(broken_first.url["standard"] + "/health").status_code == 200  # alive, just not ready
    ok = httpx.post(broken_first.url["standard"] + "/v1/completions", json={"model": "gemma3-270m", "prompt": "Hi", "max_tokens": 1}, timeout=60)
    assert ok.status_code == 200  # the other model still serves


def test_ready_on_a_real_model_and_while_it_generates(server: ServerProcess) -> None:
    url = server.url["streaming"]
    first = httpx.get(url + "/ready", timeout=60)
    assert first.status_code == 200 and first.json()["model"] == "gemma3-270m"
    body = {"model": "gemma3-270m", "prompt": "Once upon a time", "max_tokens": 300, "temperature": 0.8, "stop": []}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
        assert next(r.iter_lines()).startswith("data: ")
        during = httpx.get(server.url["standard"] + "/ready", timeout=5)  # never queued behind it
        assert during.status_code == 200 and during.json()["reason"] in ("busy", "generated")
