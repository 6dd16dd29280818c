"""The pool facade: leases, loads, eviction, idle unloads, warmup and shutdown.

Concurrency model: all bookkeeping runs on the event loop; only blocking work (estimating a file,
loading, closing, warmup generation) runs in worker threads. A request takes a free slot at once
when nobody is queued ahead of it; otherwise it joins the model's FIFO and `_pump` hands out slots
in order whenever one frees up, a load finishes or memory is released. Every worker thread that
runs a model's native code (load, warmup, close) does so inside `crash.model_context(model_id)`.

Isolation (capibara6/workers): with `isolation: worker` (the default; never for remote entries or
a custom `loader=`) each instance is a worker process pinned to CPUs from `self.placement`; its
death comes back through `_crashed` on the loop (instance dropped, counted, next request loads
again), and a worker that dies while loading holds the model back (`CRASH_BACKOFF_S`, doubling).
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import itertools
import logging
import threading
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable, Coroutine, TypeVar, cast

from .. import crash
from ..backends import backend_class, estimate, load_backend
from ..backends.base import Backend
from ..config import ModelSpec, Registry
from ..errors import ModelBusy, ModelCrashed, ModelNotFound, QueueFull, ServiceUnavailable
from ..metrics import Metrics
from ..threads import resolve_threads
from ..types import Estimate, GenerationOutcome, SamplingParams, TextPrompt
from ..workers.placement import Placement
from .budget import GIB, budget_bytes, choose_victims
from .queue import Waiter
from .slots import Instance, ModelSlot

log = logging.getLogger("capibara6.pool")

Loader = Callable[[str, ModelSpec, int], Backend]
Estimator = Callable[[str, ModelSpec], Estimate]
Clock = Callable[[], float]

T = TypeVar("T")

class OneAtATime:
    """The class side assumed for a custom loader: one lease per instance, the plain thread rule."""

    @staticmethod
    def max_concurrency(spec: ModelSpec) -> int:
        return 1

    @staticmethod
    def threads(spec: ModelSpec) -> int:
        return resolve_threads(spec.n_threads, concurrent=spec.parallel)


CRASH_BACKOFF_S = 2.0  # a load that crashes holds the model back 2, 4, 8 ... s
CRASH_BACKOFF_MAX_S = 300.0
SHUTDOWN_WAIT_S = 5.0  # close(): how long a still-running lease may keep its instance
WARMUP_PROMPT = "The quick brown fox jumps over the lazy dog. Once upon a time"




class ModelPool:
    def __init__(
        self,
        registry: Registry,
        loader: Loader | None = None,
        metrics: Metrics | None = None,
        *,
        estimator: Estimator | None = None,
        classes: Callable[[ModelSpec], Any] | None = None,
        clock: Clock = time.monotonic,
        memory_budget: int | None = None,
    ) -> None:
        self.registry = registry
        self.metrics = metrics or Metrics()
        self.metrics.watch_pool(self)
        # the class side (threads, leases per instance) of each entry's backend; a custom loader
        # (tests) serves one lease per instance unless its test says otherwise
        self._classes = classes or (backend_class if loader is None else (lambda spec: OneAtATime))
        self._loader = loader or (lambda mid, spec, n: load_backend(mid, spec, registry.base_dir, n))
        self._workers = loader is None  # a custom loader (tests' fakes) stays in process
        self.placement = Placement()
        self._keys = itertools.count(1)
        self._estimator = estimator or (lambda mid, spec: estimate(spec, registry.base_dir))
        self._clock = clock
        self.max_loaded = registry.pool.max_loaded
        self.memory_budget = memory_budget if memory_budget is not None else budget_bytes(registry.pool.memory_budget_gb)
        self._slots = {mid: ModelSlot(mid, spec) for mid, spec in registry.models.items()}
        self._closing = False
        self._reaper: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- views -----------------------------------------------------------------------------

    def status(self, model_id: str) -> str:
        """unloaded | loading | ready | busy | unloading (never waits)."""
        return self._slots[model_id].state

    def loaded(self, model_id: str) -> Backend | None:
        slot = self._slots[model_id]
        return slot.instances[0].backend if slot.instances else None

    def metric_snapshot(self) -> list[tuple[str, str, int]]:
        out = []
        for mid, slot in self._slots.items():
            kv = 0
            for inst in slot.instances:
                kv += inst.backend.kv_cache_bytes()
            out.append((mid, slot.state, kv))
        return out

    def describe(self, model_id: str) -> dict[str, Any]:
        """Lifecycle details for the admin API."""
        slot = self._slot(model_id)
        idle = None if slot.idle_since is None else round(self._clock() - slot.idle_since, 3)
        return {
            "id": model_id,
            "status": slot.state,
            "instances": len(slot.instances),
            "leases": slot.leases,
            "capacity": slot.capacity,
            "waiting": len(slot.queue),
            "memory_bytes": slot.held_bytes,
            "idle_s": idle,
            "idle_unload_s": slot.spec.idle_unload_s,
            "isolation": "worker" if self._isolated(slot.spec) else "in_process",
            "workers": [{"pid": getattr(i.backend, "pid", None), "cpus": list(self.placement.given.get(i.key, ()))}
                        for i in slot.instances if i.key is not None],
            "crash_reason": slot.crash_reason,
            "crashes_in_a_row": slot.load_crashes,
        }

    def rss_snapshot(self) -> list[tuple[str, int]]:
        """(model id, resident bytes of its worker processes) per model running in workers."""
        return [(mid, sum(i.backend.memory_bytes() for i in s.instances)) for mid, s in self._slots.items()
                if self._isolated(s.spec)]

    def _isolated(self, spec: ModelSpec) -> bool:
        return self._workers and spec.isolation == "worker" and spec.backend != "remote"

    def memory_used(self) -> int:
        return sum(s.held_bytes for s in self._slots.values())

    # -- leases ----------------------------------------------------------------------------

    @asynccontextmanager
    async def lease(
        self, model_id: str, *, touch: bool = True, on_queued: Callable[[], None] | None = None
    ) -> AsyncIterator[Backend]:
        """One generation slot on a loaded instance; waits in the model's queue if needed.

        touch=False (health probes): an idle model's idle clock and LRU place are kept, so a
        load balancer polling /ready does not keep a model loaded forever.
        on_queued: called once, before the first wait, when the request joins the queue (no free
        slot, or the model must load first); never called for a refusal (QueueFull, shutdown).
        A streaming response sends its headers then.
        """
        slot = self._slot(model_id)
        kept = (slot.last_used, slot.idle_since) if slot.instances and not slot.leases else None
        slot, inst = await self._acquire(model_id, on_queued)
        try:
            yield inst.backend
        finally:
            self._release(slot, inst)
            if not touch and kept is not None and slot.instances and not slot.leases:
                slot.last_used, slot.idle_since = kept

    def _slot(self, model_id: str) -> ModelSlot:
        slot = self._slots.get(model_id)
        if slot is None:
            raise ModelNotFound(model_id)
        return slot

    async def _acquire(self, model_id: str, on_queued: Callable[[], None] | None = None) -> tuple[ModelSlot, Instance]:
        slot = self._slot(model_id)
        if self._closing:
            raise ServiceUnavailable("The server is shutting down.", code="shutting_down")
        self._start_reaper()
        wait = slot.held_until - self._clock()
        if not slot.instances and slot.loading is None and wait > 0:
            raise ModelCrashed(
                f"Model '{model_id}' is held back for {wait:.0f} s after {slot.load_crashes} crashed load(s): {slot.crash_reason}.",
                retry_after_s=max(1, int(wait + 0.999)),
            )
        inst = slot.free_instance() if not slot.queue else None
        if inst is not None:
            self._grant(slot, inst)
            return slot, inst
        # waiters that free or loading capacity will serve are not "queued"; the rest are
        spare = max(0, slot.capacity - slot.leases)
        if len(slot.queue) + 1 - spare > slot.spec.max_queue:
            raise QueueFull(model_id, retry_after_s=1)
        waiter = Waiter()
        slot.queue.push(waiter)
        slot.blocked = False  # a new request retries a load that found no room before
        self._pump(slot)
        if on_queued is not None and not waiter.future.done():
            on_queued()
        try:
            done = await self._wait(slot, waiter)
        except BaseException:  # cancelled: the client went away or the server stops
            self._abandon(slot, waiter)
            raise
        if not done:
            self._abandon(slot, waiter)
            raise ServiceUnavailable(
                f"Timed out after {slot.spec.queue_timeout_s:g} s waiting for model '{model_id}'.",
                code="queue_timeout",
                retry_after_s=1,
            )
        return slot, waiter.future.result()  # raises the load error, if that is what came

    async def _wait(self, slot: ModelSlot, waiter: Waiter) -> bool:
        """Wait up to queue_timeout_s for a grant. The clock stops while the model's first
        instance loads: a big model may take longer to load than anyone should queue."""
        left = slot.spec.queue_timeout_s
        while left > 0:
            cold = slot.loading if not slot.instances else None
            if cold is not None:
                await asyncio.wait({waiter.future, cold}, return_when=asyncio.FIRST_COMPLETED)
            else:  # also wakes when a load starts (e.g. a busy model went idle and is evicted)
                t0 = time.monotonic()
                await asyncio.wait({waiter.future, slot.load_started()}, timeout=left, return_when=asyncio.FIRST_COMPLETED)
                left -= time.monotonic() - t0
            if waiter.future.done():
                return True
        return False

    def _abandon(self, slot: ModelSlot, waiter: Waiter) -> None:
        """A waiter gives up. A grant that raced with it goes straight back: no slot leaks."""
        slot.queue.remove(waiter)
        fut = waiter.future
        if not fut.done():
            fut.cancel()
        elif not fut.cancelled():
            if fut.exception() is None:
                self._release(slot, fut.result())

    def _grant(self, slot: ModelSlot, inst: Instance) -> None:
        inst.leases += 1
        slot.last_used = self._clock()
        slot.idle_since = None
        slot.idle_event.clear()

    def _release(self, slot: ModelSlot, inst: Instance) -> None:
        inst.leases -= 1
        now = slot.last_used = self._clock()
        if slot.leases == 0 and slot.instances:
            slot.idle_since = now  # the idle clock starts when the last lease ends
            slot.idle_event.set()
        self._pump(slot)
        if slot.evictable:
            self._unblock_others(slot)

    def _pump(self, slot: ModelSlot) -> None:
        """Hand free slots to waiters in arrival order; start a load if they need one."""
        if self._closing or slot.unloading:
            return
        while slot.queue:
            inst = slot.free_instance()
            if inst is None:
                break
            waiter = slot.queue.pop()
            if waiter is None:
                break
            self._grant(slot, inst)
            waiter.future.set_result(inst)
        if slot.queue and slot.can_grow():
            slot.loading = self._spawn(self._load(slot))
            slot.signal_load_started()

    def _unblock_others(self, freed: ModelSlot) -> None:
        """Something became evictable or was freed: loads waiting for room may retry."""
        for slot in self._slots.values():
            if slot is not freed and slot.queue:
                slot.blocked = False
                self._pump(slot)

    # -- loading ---------------------------------------------------------------------------

    async def _load(self, slot: ModelSlot) -> None:
        mid, spec = slot.model_id, slot.spec
        first = not slot.instances
        try:
            if slot.estimate is None:
                slot.estimate = await asyncio.to_thread(self._estimator, mid, spec)
            need = slot.estimate.first if first else slot.estimate.extra
            evicted = self._make_room(slot, need, first)
            if evicted is None:
                return
            slot.reserved = need
            await asyncio.gather(*(self._close(v, insts, "evicted") for v, insts in evicted))
            t0 = time.monotonic()
            key, backend = await self._load_instance(slot)
        except Exception as err:  # any load failure: this model is unavailable, others serve
            self._load_failed(slot, err, first)
            return
        finally:
            slot.loading = None
            slot.reserved = 0
        slot.load_crashes = 0
        slot.crash_reason = None
        charged = need
        if first:
            charged = int(backend.memory_bytes()) or need
        slot.instances.append(Instance(backend, self._capacity(spec), charged, key=key))
        if first:
            slot.idle_since = slot.last_used = self._clock()
        self.metrics.loads.labels(mid).inc()
        self.metrics.load_time.labels(mid).observe(time.monotonic() - t0)
        log.info("loaded %s (instance %d, %.0f MB)", mid, len(slot.instances), charged / 1e6)
        self._pump(slot)

    async def _load_instance(self, slot: ModelSlot) -> tuple[str | None, Backend]:
        """Load one instance: in a worker process pinned to its CPUs, or in process (custom loader,
        `isolation: in_process`, remote)."""
        mid, spec, n = slot.model_id, slot.spec, self._threads(slot.spec)
        if not self._isolated(spec):
            return None, await asyncio.to_thread(_as_model(mid, self._loader), mid, spec, n)
        from ..backends import model_path
        from ..workers import WorkerBackend

        key = f"{mid}#{next(self._keys)}"
        cpus = self.placement.assign(key, n)
        loop = asyncio.get_running_loop()

        def on_crash(reason: str) -> None:
            loop.call_soon_threadsafe(self._crashed, slot, key, reason)

        try:
            path = model_path(spec, self.registry.base_dir)
            return key, await asyncio.to_thread(WorkerBackend, mid, spec, path, n, cpus, on_crash)
        except BaseException:
            self.placement.release(key)
            raise

    def _crashed(self, slot: ModelSlot, key: str, reason: str) -> None:
        """A worker died under a loaded instance: drop it (its leases fail on their own), count it,
        and let the next request load the model again."""
        self.placement.release(key)
        inst = next((i for i in slot.instances if i.key == key), None)
        if inst is None:
            return
        slot.instances.remove(inst)
        slot.crash_reason = reason
        if not slot.instances:
            slot.idle_since = None
        self.metrics.crashes.labels(slot.model_id).inc()
        self.metrics.unloads.labels(slot.model_id, "crashed").inc()
        log.error("model %s crashed: %s", slot.model_id, reason)
        self._spawn(asyncio.to_thread(inst.backend.close))
        self._pump(slot)
        self._unblock_others(slot)

    def _make_room(self, slot: ModelSlot, need: int, first: bool) -> list[tuple[ModelSlot, list[Instance]]] | None:
        """Take LRU idle victims' instances so `need` fits; None when the load must wait or fail."""
        others = [s for s in self._slots.values() if s is not slot]
        victims = choose_victims(
            others,
            models_held=1 + sum(s.holds_model for s in others),
            max_loaded=self.max_loaded,
            used=self.memory_used(),
            need=need,
            budget=self.memory_budget,
        )
        if victims is not None:  # taken now, before any await, so nobody leases them meanwhile
            return [(v, v.take_instances()) for v in cast(list[ModelSlot], victims)]
        if slot.held_bytes + need > self.memory_budget:  # would not fit even in an empty pool
            why = f"needs ~{need / GIB:.2f} GiB; the pool's memory budget is {self.memory_budget / GIB:.2f} GiB"
            if first:
                slot.queue.fail_all(ServiceUnavailable(f"Model '{slot.model_id}' cannot be loaded: {why}."))
            else:
                slot.instance_cap = len(slot.instances)
            log.warning("%s: %s", slot.model_id, why)
            return None
        slot.blocked = True  # busy models hold the room; retried when one becomes idle
        log.info("%s waits for room (max_loaded %d, budget %.2f GiB)", slot.model_id, self.max_loaded, self.memory_budget / GIB)
        return None

    def _load_failed(self, slot: ModelSlot, err: Exception, first: bool) -> None:
        log.warning("loading %s failed: %s", slot.model_id, err)
        slot.estimate = None  # the file may be replaced before the next try
        if isinstance(err, ModelCrashed):  # the worker died loading: hold the model back
            slot.load_crashes += 1
            slot.crash_reason = err.message
            slot.held_until = self._clock() + min(CRASH_BACKOFF_MAX_S, CRASH_BACKOFF_S * 2 ** (slot.load_crashes - 1))
            self.metrics.crashes.labels(slot.model_id).inc()
        if first:
            slot.queue.fail_all(err if isinstance(err, ModelCrashed) else
                                ServiceUnavailable(f"Model '{slot.model_id}' could not be loaded: {err}"))
        else:
            slot.instance_cap = len(slot.instances)  # serve with what loaded
        self._unblock_others(slot)

    def _threads(self, spec: ModelSpec) -> int:
        """Threads per instance, as the backend class decides them (the one place: its `threads`)."""
        return self._classes(spec).threads(spec)

    def _capacity(self, spec: ModelSpec) -> int:
        """Leases one instance serves: `parallel` on a batching instance, else 1."""
        return max(1, min(spec.parallel, self._classes(spec).max_concurrency(spec)))

    async def load(self, model_id: str) -> str:
        """Make sure the model is loaded (admin, warmup); returns its state."""
        slot = self._slot(model_id)
        if not slot.instances or slot.unloading:
            async with self.lease(model_id):
                pass
        return slot.state

    # -- unloading -------------------------------------------------------------------------

    async def unload(self, model_id: str, reason: str = "admin") -> bool:
        """Unload now; ModelBusy while leases or a load are in flight. False if not loaded."""
        slot = self._slot(model_id)
        if slot.leases or slot.loading is not None:
            raise ModelBusy(model_id, "busy" if slot.leases else "loading")
        if slot.unloading:
            raise ModelBusy(model_id, "unloading")
        if not slot.instances:
            return False
        await self._close(slot, slot.take_instances(), reason)
        return True

    async def _close(self, slot: ModelSlot, insts: list[Instance], reason: str) -> None:
        """Free taken instances for real: close the backends, drop them, collect, trim the heap."""
        try:
            for inst in insts:
                if inst.key is not None:
                    self.placement.release(inst.key)
                try:
                    await asyncio.to_thread(_as_model(slot.model_id, inst.backend.close))
                except Exception as err:  # a failing close must not keep the slot unloading
                    log.warning("closing %s failed: %s", slot.model_id, err)
            insts.clear()
            await asyncio.to_thread(release_memory)
        finally:
            slot.unloading = False
            slot.freeing = 0
            self.metrics.unloads.labels(slot.model_id, reason).inc()
            log.info("unloaded %s (%s)", slot.model_id, reason)
        self._pump(slot)  # requests that arrived while it was unloading load it again
        self._unblock_others(slot)

    async def reap(self) -> list[str]:
        """Unload every model idle past its idle_unload_s; returns their ids."""
        now = self._clock()
        due = [s for s in self._slots.values() if s.idle_expired(now)]
        await asyncio.gather(*(self._close(s, s.take_instances(), "idle") for s in due))
        return [s.model_id for s in due]

    def _reap_interval(self) -> float | None:
        limits = [s.spec.idle_unload_s for s in self._slots.values() if s.spec.idle_unload_s > 0]
        return min(5.0, max(0.05, min(limits) / 4)) if limits else None

    def _start_reaper(self) -> None:
        interval = self._reap_interval()
        if self._reaper is None and interval is not None and not self._closing:
            self._reaper = asyncio.get_running_loop().create_task(self._reap_loop(interval))

    async def _reap_loop(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.reap()
            except Exception:  # the reaper must outlive one bad close
                log.exception("idle unload failed")

    # -- start-up and shutdown -------------------------------------------------------------

    async def warmup(self, model_ids: list[str] | None = None) -> dict[str, str | None]:
        """Load each model and run one short generation, so no user pays the cold start.

        Returns model id -> None (warm) or the error; a failure is logged, not fatal.
        """
        results: dict[str, str | None] = {}
        for mid in self.registry.pool.warmup if model_ids is None else model_ids:
            t0 = time.monotonic()
            try:
                async with self.lease(mid) as backend:
                    await _in_thread(_as_model(mid, warm_generate), backend)
                results[mid] = None
                log.info("warmed %s in %.2f s", mid, time.monotonic() - t0)
            except Exception as err:
                results[mid] = str(err)
                log.warning("warmup of %s failed: %s", mid, err)
        return results

    async def close(self) -> None:
        """Shutdown: refuse new leases, fail waiters, finish loads, unload everything idle."""
        self._closing = True
        if self._reaper is not None:
            self._reaper.cancel()
            await asyncio.gather(self._reaper, return_exceptions=True)
        for slot in self._slots.values():
            slot.queue.fail_all(ServiceUnavailable("The server is shutting down.", code="shutting_down"))
        await asyncio.gather(*list(self._tasks), return_exceptions=True)
        for slot in self._slots.values():
            if slot.leases:
                try:
                    await asyncio.wait_for(slot.idle_event.wait(), SHUTDOWN_WAIT_S)
                except asyncio.TimeoutError:
                    log.warning("%s still busy at shutdown; left to the process exit", slot.model_id)
                    continue
            if slot.instances:
                await self._close(slot, slot.take_instances(), "shutdown")

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


def _as_model(model_id: str, fn: Callable[..., T]) -> Callable[..., T]:
    """`fn` run inside `crash.model_context(model_id)` on whichever thread calls it, so a fatal
    signal in the model's native code (llama.cpp loading, decoding, freeing) names the model."""

    def run(*args: Any) -> T:
        with crash.model_context(model_id):
            return fn(*args)

    return run


async def _in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """Run in a thread; if cancelled, still wait for the thread (it may be inside a backend)."""
    fut = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        await asyncio.gather(fut, return_exceptions=True)
        raise


def warm_generate(backend: Backend) -> None:
    """A few greedy tokens: faults the weights in and builds llama.cpp's compute graph."""
    prepared = backend.prepare(TextPrompt(WARMUP_PROMPT))
    params = SamplingParams(max_tokens=4, temperature=0.0)
    for _ in backend.generate(prepared, params, GenerationOutcome(), threading.Event()):
        pass


def release_memory() -> None:
    """Collect cycles, then hand freed heap pages back to the OS (glibc keeps them otherwise)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
