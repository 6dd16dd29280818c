"""CPU thread budgeting.

llama.cpp's worker threads spin while waiting for each other. On a 2-core box, 2 threads decode at
83 tok/s when the machine is quiet but fall to 8 or even 0.4 tok/s as soon as one other process is
busy, while 1 thread keeps 55 tok/s. So `n_threads: auto` never asks for more threads than the
CPUs this process may use, leaves one CPU for everything else (the event loop's HTTP, tokenisation
and SSE framing, and any other process), and splits the rest between generations that run at the
same time. On a 2-core box that is 1 thread: 30% slower than 2 on an idle machine, but it keeps
its speed when anything else runs, where 2 threads collapse.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger("capibara6.threads")


def _cgroup_cpu_limit() -> int | None:
    """CPUs allowed by a cgroup v2 quota (systemd CPUQuota=, containers), if any."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return max(1, int(int(quota) // int(period)))


_server_cpus: tuple[int, ...] | None = None


def server_cpus() -> list[int]:
    """The CPUs this process may run on: its affinity mask as it was the first time anything asked
    (the server's start; in a worker, once it pinned itself), read from the main thread's mask.
    Never the calling thread's: while a worker stream relays, the server's relaying threads are
    pinned to a few CPUs (capibara6/workers/proxy.py), and a thread count or a placement worked
    out on one of them would count those few."""
    global _server_cpus
    if _server_cpus is None:
        try:
            _server_cpus = tuple(sorted(os.sched_getaffinity(os.getpid())))
        except (AttributeError, OSError):  # not Linux
            _server_cpus = tuple(range(os.cpu_count() or 1))
    return list(_server_cpus)


def usable_cpus() -> int:
    """CPUs this process may run on: the server's affinity mask (`server_cpus`), capped by a
    cgroup quota."""
    n = len(server_cpus())
    limit = _cgroup_cpu_limit()
    return max(1, min(n, limit) if limit else n)


def inference_cpus(total: int | None = None) -> int:
    """CPUs for inference: all but one (kept for the server and its neighbours), at least one."""
    n = usable_cpus() if total is None else total
    return max(1, n - 1)


def auto_threads(concurrent: int = 1, total: int | None = None) -> int:
    """Threads per generation when `concurrent` generations share the inference CPUs."""
    return max(1, inference_cpus(total) // max(1, concurrent))


def resolve_threads(setting: int | str, concurrent: int = 1, total: int | None = None) -> int:
    """A model's `n_threads` setting (an int or "auto") as a thread count."""
    if setting == "auto":
        return auto_threads(concurrent, total)
    return max(1, int(setting))


class IdleThreads:
    """Runs calls on threads kept for reuse: a call wakes an idle thread if there is one (a
    queue put, no wait) and starts a new one otherwise, so any number run at once; a thread that
    finds `keep` others idle when it is done exits. A call's exception is logged, the thread kept."""

    def __init__(self, name: str, keep: int = 8) -> None:
        self.name = name
        self.keep = keep
        self._lock = threading.Lock()
        self._idle: list[queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...]]]] = []

    def run(self, fn: Callable[..., Any], *args: Any) -> None:
        with self._lock:
            inbox = self._idle.pop() if self._idle else None
        if inbox is not None:
            inbox.put((fn, args))
            return
        inbox = queue.SimpleQueue()
        inbox.put((fn, args))
        threading.Thread(target=self._serve, args=(inbox,), name=self.name, daemon=True).start()

    def idle(self) -> int:
        with self._lock:
            return len(self._idle)

    def _serve(self, inbox: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...]]]) -> None:
        while True:
            fn, args = inbox.get()
            try:
                fn(*args)
            except BaseException:
                log.exception("%s: call failed", self.name)
            del fn, args  # nothing of the call outlives it while the thread idles
            with self._lock:
                if len(self._idle) >= self.keep:
                    return
                self._idle.append(inbox)
