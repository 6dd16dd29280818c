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

import os
from pathlib import Path


def _cgroup_cpu_limit() -> int | None:
    """CPUs allowed by a cgroup v2 quota (systemd CPUQuota=, containers), if any."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return max(1, int(int(quota) // int(period)))


def usable_cpus() -> int:
    """CPUs this process may run on: the affinity mask, capped by a cgroup quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
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
