"""Pool scheduling with a deterministic fake backend (loader seam) and an injected clock.

These pin the queueing, eviction and idle rules exactly; tests/test_pool_lifecycle.py proves
the same lifecycle with the real llama.cpp backend.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any, Awaitable, Callable, Iterator, Sequence, TypeVar

import pytest

from capibara6.config import ModelSpec, parse_registry
from capibara6.errors import ModelNotFound, QueueFull, ServiceUnavailable
from capibara6.pool import Estimate, ModelBusy, ModelPool
from capibara6.threads import resolve_threads
from capibara6.types import GenerationOutcome, SamplingParams, TokenEvent
from tests.fakes import FakeBackendBase

T = TypeVar("T")


def run(coro: Awaitable[T]) -> T:
    return asyncio.run(coro)  # type: ignore[arg-type]


class FakeBackend(FakeBackendBase):
    def __init__(self, model_id: str, n_threads: int, max_concurrency: int = 1, close_delay: float = 0.0) -> None:
        self.model_id = model_id
        self.close_delay = close_delay
        self.n_ctx = 512
        self.n_threads = n_threads
        self.max_concurrency = max_concurrency
        self.closed = False
        self.generated = 0

    def tokenize(self, text: str, *, add_bos: bool = True) -> list[int]:
        return [1] * max(1, len(text.split()))

    def chat_prompt(self, messages: Sequence[dict[str, object]]) -> tuple[str, tuple[str, ...]]:
        return "x", ()

    def generate(self, prompt: Any, params: SamplingParams, outcome: GenerationOutcome, cancel: threading.Event) -> Iterator[TokenEvent]:
        assert not self.closed, "generate on a closed backend"
        self.generated += 1
        for i in range(params.max_tokens):
            outcome.completion_tokens += 1
            yield TokenEvent(i, "t")

    def memory_bytes(self) -> int:
        return 100

    def close(self) -> None:
        time.sleep(self.close_delay)
        self.closed = True


class FakeClass:
    """The class side of FakeBackend (contract v2): leases per instance and the plain thread rule."""

    def __init__(self, max_concurrency: int) -> None:
        self._mc = max_concurrency

    def max_concurrency(self, spec: Any) -> int:
        return self._mc

    def threads(self, spec: Any) -> int:
        return resolve_threads(spec.n_threads, concurrent=spec.parallel)


class FakeLoader:
    """Records loads; `delay` seconds per load; ids in `fail` raise (once each if `fail_once`)."""

    def __init__(
        self, delay: float = 0.0, fail: set[str] | None = None, fail_once: bool = False, max_concurrency: int = 1,
        close_delay: float = 0.0,
    ) -> None:
        self.close_delay = close_delay
        self.calls: list[tuple[str, int]] = []
        self.backends: list[FakeBackend] = []
        self.delay = delay
        self.fail = set(fail or ())
        self.fail_once = fail_once
        self.max_concurrency = max_concurrency

    def __call__(self, model_id: str, spec: ModelSpec, n_threads: int) -> FakeBackend:
        self.calls.append((model_id, n_threads))
        time.sleep(self.delay)
        if model_id in self.fail:
            if self.fail_once:
                self.fail.discard(model_id)
            raise ValueError(f"corrupt file for {model_id}")
        b = FakeBackend(model_id, n_threads, self.max_concurrency, self.close_delay)
        self.backends.append(b)
        return b

    def loads(self, model_id: str) -> int:
        return sum(1 for mid, _ in self.calls if mid == model_id)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_pool(
    ids: Sequence[str] = ("a", "b"), *, loader: FakeLoader | None = None, clock: Callable[[], float] = time.monotonic,
    max_loaded: int = 4, budget: int = 10**12, estimate: int = 100, **model: Any,
) -> tuple[ModelPool, FakeLoader]:
    raw = {
        "defaults": {"n_ctx": 512, "n_threads": 1, **model},
        "pool": {"max_loaded": max_loaded},
        "models": {mid: {"source": {"path": f"/nonexistent/{mid}.gguf"}} for mid in ids},
    }
    loader = loader or FakeLoader()
    pool = ModelPool(
        parse_registry(raw), loader, estimator=lambda mid, spec: Estimate(estimate, 0, 0), clock=clock, memory_budget=budget,
        classes=lambda spec: FakeClass(loader.max_concurrency),
    )
    return pool, loader


def counter(pool: ModelPool, name: str, **labels: str) -> float:
    return pool.metrics.registry.get_sample_value(name, labels) or 0.0


async def hold(pool: ModelPool, mid: str, release: asyncio.Event, got: asyncio.Event | None = None) -> None:
    async with pool.lease(mid):
        if got is not None:
            got.set()
        await release.wait()


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_single_flight_five_first_requests_one_load() -> None:
    async def main() -> list[str]:
        pool, loader = make_pool(loader=FakeLoader(delay=0.2))
        order: list[str] = []

        async def one(i: int) -> None:
            async with pool.lease("a") as backend:
                order.append(f"{i}:{backend.model_id}")
                await asyncio.sleep(0.01)

        tasks = [asyncio.create_task(one(i)) for i in range(5)]
        await settle()
        assert pool.status("a") == "loading"  # status never waits for the load
        await asyncio.gather(*tasks)
        assert loader.loads("a") == 1
        assert counter(pool, "capibara6_model_loads_total", model="a") == 1
        assert pool.status("a") == "ready"
        await pool.close()
        return order

    assert run(main()) == [f"{i}:a" for i in range(5)]  # FIFO: served in arrival order


def test_queue_full_is_429_with_retry_after() -> None:
    async def main() -> None:
        pool, _ = make_pool(max_queue=2)
        release, got = asyncio.Event(), asyncio.Event()
        holder = asyncio.create_task(hold(pool, "a", release, got))
        await got.wait()
        waiters = [asyncio.create_task(hold(pool, "a", release)) for _ in range(2)]
        await settle()
        with pytest.raises(QueueFull) as info:
            async with pool.lease("a"):
                pass
        assert info.value.status == 429 and info.value.headers["Retry-After"].isdigit()
        assert info.value.body()["error"]["code"] == "queue_full"
        assert pool.status("b") == "unloaded"  # other models have their own queue
        async with pool.lease("b"):
            pass
        release.set()
        await asyncio.gather(holder, *waiters)
        await pool.close()

    run(main())


def test_queue_timeout_is_503_and_leaves_no_trace() -> None:
    async def main() -> None:
        pool, _ = make_pool(queue_timeout_s=0.2)
        release, got = asyncio.Event(), asyncio.Event()
        holder = asyncio.create_task(hold(pool, "a", release, got))
        await got.wait()
        t0 = time.monotonic()
        with pytest.raises(ServiceUnavailable) as info:
            async with pool.lease("a"):
                pass
        assert info.value.code == "queue_timeout" and info.value.status == 503
        assert time.monotonic() - t0 >= 0.19
        assert pool.describe("a")["waiting"] == 0
        release.set()
        await holder
        async with pool.lease("a"):  # immediately available again
            assert pool.describe("a")["leases"] == 1
        await pool.close()

    run(main())


def test_cancelled_waiter_leaves_the_queue_and_never_leaks_a_slot() -> None:
    async def main() -> None:
        pool, _ = make_pool()
        release, got = asyncio.Event(), asyncio.Event()
        holder = asyncio.create_task(hold(pool, "a", release, got))
        await got.wait()
        gone = asyncio.create_task(hold(pool, "a", asyncio.Event()))
        await settle()
        assert pool.describe("a")["waiting"] == 1
        gone.cancel()  # the client disconnected while queued
        await asyncio.gather(gone, return_exceptions=True)
        assert pool.describe("a")["waiting"] == 0

        # the race: the slot is granted and the waiter is cancelled in the same loop turn
        racer = asyncio.create_task(hold(pool, "a", asyncio.Event()))
        await settle()
        release.set()
        await settle()  # holder releases -> racer granted (its task not yet resumed)
        assert pool.describe("a")["leases"] == 1 and not racer.done()
        racer.cancel()
        await asyncio.gather(holder, racer, return_exceptions=True)
        assert pool.describe("a")["leases"] == 0
        async with pool.lease("a"):  # a later request gets straight through
            pass
        await pool.close()

    run(main())


def test_failed_load_then_good_load_and_others_unaffected() -> None:
    async def main() -> None:
        pool, loader = make_pool(loader=FakeLoader(fail={"a"}, fail_once=True))
        results = await asyncio.gather(*(pool.load("a") for _ in range(3)), return_exceptions=True)
        assert all(isinstance(r, ServiceUnavailable) and r.code == "model_unavailable" for r in results)
        assert "corrupt file for a" in str(results[0])
        assert loader.loads("a") == 1 and pool.status("a") == "unloaded"
        async with pool.lease("b"):
            pass
        async with pool.lease("a") as backend:  # the next request tries again
            assert backend.model_id == "a"
        assert loader.loads("a") == 2
        await pool.close()

    run(main())


def test_lru_eviction_with_max_loaded() -> None:
    async def main() -> None:
        pool, loader = make_pool(("a", "b", "c"), max_loaded=2, clock=clock)
        for mid in ("a", "b"):
            clock.now += 1
            await pool.load(mid)
        clock.now += 1
        async with pool.lease("a"):  # a is now more recently used than b
            pass
        clock.now += 1
        await pool.load("c")
        assert [pool.status(m) for m in "abc"] == ["ready", "unloaded", "ready"]
        assert counter(pool, "capibara6_model_unloads_total", model="b", reason="evicted") == 1
        assert [b.closed for b in loader.backends] == [False, True, False]
        await pool.close()

    clock = Clock()
    run(main())


def test_busy_model_is_never_evicted() -> None:
    async def main() -> None:
        # closing a takes longer than the queue timeout: the eviction and the load must not count
        pool, _ = make_pool(max_loaded=1, queue_timeout_s=0.3, loader=FakeLoader(close_delay=0.5))
        release, got = asyncio.Event(), asyncio.Event()
        holder = asyncio.create_task(hold(pool, "a", release, got))
        await got.wait()
        with pytest.raises(ServiceUnavailable) as info:  # b cannot load: a is busy
            await pool.load("b")
        assert info.value.code == "queue_timeout"
        assert pool.status("a") == "busy" and pool.status("b") == "unloaded"
        waiting_b = asyncio.create_task(pool.load("b"))
        await asyncio.sleep(0.1)
        assert pool.status("a") == "busy" and not waiting_b.done()
        release.set()  # a goes idle: now it is evicted and b loads
        await holder
        assert await waiting_b == "ready"
        assert pool.status("a") == "unloaded"
        await pool.close()

    run(main())


def test_memory_budget_evicts_and_refuses_what_never_fits() -> None:
    async def main() -> None:
        pool, _ = make_pool(("a", "b", "c"), budget=250, estimate=100)
        await pool.load("a")
        await pool.load("b")
        assert pool.memory_used() == 200  # memory_bytes() of the fakes
        await pool.load("c")  # 300 > 250: the least recently used goes
        assert [pool.status(m) for m in "abc"] == ["unloaded", "ready", "ready"]
        await pool.close()

        big, _ = make_pool(("a",), budget=50, estimate=100)
        with pytest.raises(ServiceUnavailable) as info:
            await big.load("a")
        assert info.value.code == "model_unavailable" and "memory budget" in info.value.message
        await big.close()

    run(main())


def test_idle_unload_clock_starts_when_the_last_lease_ends() -> None:
    async def main() -> None:
        pool, loader = make_pool(("a", "b"), clock=clock, idle_unload_s=10)
        release, got = asyncio.Event(), asyncio.Event()
        holder = asyncio.create_task(hold(pool, "a", release, got))
        await got.wait()
        clock.now += 100  # a stream far longer than the idle timeout
        assert await pool.reap() == [] and pool.status("a") == "busy"
        release.set()
        await holder
        clock.now += 9
        assert await pool.reap() == []
        clock.now += 1
        assert await pool.reap() == ["a"]
        assert pool.status("a") == "unloaded" and loader.backends[0].closed
        assert counter(pool, "capibara6_model_unloads_total", model="a", reason="idle") == 1
        await pool.close()

    clock = Clock()
    run(main())


def test_idle_unload_zero_means_never() -> None:
    async def main() -> None:
        pool, _ = make_pool(("a",), clock=clock, idle_unload_s=0)
        await pool.load("a")
        clock.now += 10**6
        assert await pool.reap() == [] and pool.status("a") == "ready"
        await pool.close()

    clock = Clock()
    run(main())


def test_parallel_instances_split_threads() -> None:
    async def main() -> None:
        pool, loader = make_pool(("a",), parallel=2, n_threads="auto")
        release = asyncio.Event()
        got = [asyncio.Event(), asyncio.Event()]
        tasks = [asyncio.create_task(hold(pool, "a", release, g)) for g in got]
        await asyncio.wait_for(asyncio.gather(*(g.wait() for g in got)), 5)  # both run at once
        assert loader.loads("a") == 2 and pool.describe("a")["instances"] == 2
        assert {n for _, n in loader.calls} == {resolve_threads("auto", concurrent=2)}
        third = asyncio.create_task(hold(pool, "a", release))
        await asyncio.sleep(0.05)
        assert loader.loads("a") == 2 and pool.describe("a")["waiting"] == 1  # capped at parallel
        release.set()
        await asyncio.gather(*tasks, third)
        await pool.close()

    run(main())


def test_batching_backend_shares_one_instance() -> None:
    async def main() -> None:
        pool, loader = make_pool(("a",), loader=FakeLoader(max_concurrency=8), parallel=3)
        release = asyncio.Event()
        got = [asyncio.Event() for _ in range(3)]
        tasks = [asyncio.create_task(hold(pool, "a", release, g)) for g in got]
        await asyncio.wait_for(asyncio.gather(*(g.wait() for g in got)), 5)
        assert loader.loads("a") == 1 and pool.describe("a") | {"leases": 3, "capacity": 3} == pool.describe("a")
        fourth = asyncio.create_task(hold(pool, "a", release))
        await asyncio.sleep(0.05)
        assert pool.describe("a")["waiting"] == 1 and loader.loads("a") == 1
        release.set()
        await asyncio.gather(*tasks, fourth)
        await pool.close()

    run(main())


def test_admin_unload_busy_is_409_and_idle_unloads() -> None:
    async def main() -> None:
        pool, loader = make_pool(("a",))
        release, got = asyncio.Event(), asyncio.Event()
        holder = asyncio.create_task(hold(pool, "a", release, got))
        await got.wait()
        with pytest.raises(ModelBusy) as info:
            await pool.unload("a")
        assert info.value.status == 409 and info.value.code == "model_busy"
        release.set()
        await holder
        assert await pool.unload("a") is True and pool.status("a") == "unloaded"
        assert await pool.unload("a") is False
        assert counter(pool, "capibara6_model_unloads_total", model="a", reason="admin") == 1
        with pytest.raises(ModelNotFound):
            await pool.unload("zzz")
        await pool.close()

    run(main())


def test_warmup_loads_and_generates() -> None:
    async def main() -> None:
        pool, loader = make_pool(("a", "b"), loader=FakeLoader(fail={"b"}))
        assert (await pool.warmup(["a", "b"]))["a"] is None
        assert pool.status("a") == "ready" and pool.status("b") == "unloaded"
        assert loader.backends[0].generated == 1
        await pool.close()

    run(main())


def test_close_fails_waiters_and_unloads() -> None:
    async def main() -> None:
        pool, loader = make_pool(("a",), loader=FakeLoader(delay=0.2))
        waiter = asyncio.create_task(pool.load("a"))
        await settle()
        await pool.close()
        with pytest.raises(ServiceUnavailable) as info:
            await waiter
        assert info.value.code == "shutting_down"
        assert all(b.closed for b in loader.backends) and pool.status("a") == "unloaded"
        assert counter(pool, "capibara6_model_unloads_total", model="a", reason="shutdown") == 1
        with pytest.raises(ServiceUnavailable):
            await pool.load("a")

    run(main())


def test_probe_lease_keeps_the_idle_clock() -> None:
    async def main() -> None:
        pool, _ = make_pool(("a",), clock=clock, idle_unload_s=10)
        await pool.load("a")
        clock.now += 8
        async with pool.lease("a", touch=False):  # a /ready probe
            pass
        clock.now += 3
        assert await pool.reap() == ["a"]  # 11 s since real use, though probed 3 s ago
        await pool.close()

    clock = Clock()
    run(main())
