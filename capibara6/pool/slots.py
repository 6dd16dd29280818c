"""Per-model state: loaded instances, their leases, and the model's place in the lifecycle.

Everything here is touched only from the event loop, so no locks: a check and the change that
follows it run without an `await` between them.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from ..backends.base import Backend
from ..config import ModelSpec
from ..types import Estimate
from .queue import WaitQueue


@dataclass(eq=False)
class Instance:
    """One loaded backend. `capacity` leases may share it (1 unless it batches sequences)."""

    backend: Backend
    capacity: int
    charged: int  # bytes counted against the memory budget
    leases: int = 0
    key: str | None = None  # its worker's placement key (None: in process)

    @property
    def free(self) -> bool:
        return self.leases < self.capacity


@dataclass(eq=False)
class ModelSlot:
    model_id: str
    spec: ModelSpec
    queue: WaitQueue = field(default_factory=WaitQueue)
    instances: list[Instance] = field(default_factory=list)
    loading: asyncio.Task[None] | None = None
    reserved: int = 0  # bytes reserved for the load in flight
    freeing: int = 0  # bytes of instances being closed (still in memory)
    blocked: bool = False  # a load waits for memory or a max_loaded place
    unloading: bool = False
    last_used: float = 0.0  # LRU order: when a lease last started or ended
    idle_since: float | None = None  # when the last lease ended (None while busy or unloaded)
    instance_cap: int | None = None  # lowered when an extra instance failed to load
    estimate: Estimate | None = None  # cached: the file does not change under us
    idle_event: asyncio.Event = field(default_factory=asyncio.Event)
    crash_reason: str | None = None  # how its worker last died (shown until it loads again)
    load_crashes: int = 0  # consecutive loads that crashed: the backoff's exponent
    held_until: float = 0.0  # pool clock: no load before this after crashed loads
    _load_started: asyncio.Future[None] | None = None

    def load_started(self) -> asyncio.Future[None]:
        """A future resolved when the next load of this model starts (waiters pause their clock)."""
        if self._load_started is None or self._load_started.done():
            self._load_started = asyncio.get_running_loop().create_future()
        return self._load_started

    def signal_load_started(self) -> None:
        if self._load_started is not None and not self._load_started.done():
            self._load_started.set_result(None)

    @property
    def leases(self) -> int:
        return sum(i.leases for i in self.instances)

    @property
    def state(self) -> str:
        if self.unloading:
            return "unloading"
        if self.instances:
            return "busy" if self.leases else "ready"
        return "loading" if self.loading is not None else "unloaded"

    @property
    def capacity(self) -> int:
        """Leases this model may run at once (known exactly once an instance is loaded)."""
        if self.instances and self.instances[0].capacity > 1:
            return self.instances[0].capacity
        return self.spec.parallel

    @property
    def max_instances(self) -> int:
        batching = bool(self.instances) and self.instances[0].capacity > 1
        limit = 1 if batching else self.spec.parallel
        return min(limit, self.instance_cap) if self.instance_cap is not None else limit

    @property
    def held_bytes(self) -> int:
        return sum(i.charged for i in self.instances) + self.reserved + self.freeing

    @property
    def holds_model(self) -> bool:
        """Counts toward pool.max_loaded: loaded, loading or still being freed."""
        return bool(self.instances) or self.loading is not None or self.unloading

    @property
    def evictable(self) -> bool:
        return bool(self.instances) and not self.leases and self.loading is None and not self.unloading and not self.queue

    def free_instance(self) -> Instance | None:
        if self.unloading:
            return None
        # the least-leased instance spreads load over instances of a parallel model
        free = [i for i in self.instances if i.free]
        return min(free, key=lambda i: i.leases) if free else None

    def can_grow(self) -> bool:
        return not (self.unloading or self.blocked) and self.loading is None and len(self.instances) < self.max_instances

    def take_instances(self) -> list[Instance]:
        """Start unloading: no new lease can land on these; their bytes stay counted until freed."""
        insts, self.instances = self.instances, []
        self.unloading = True
        self.freeing = sum(i.charged for i in insts)
        self.idle_since = None
        self.instance_cap = None
        return insts

    def idle_expired(self, now: float) -> bool:
        limit = self.spec.idle_unload_s
        return (
            limit > 0 and self.evictable and self.idle_since is not None and now - self.idle_since >= limit
        )
