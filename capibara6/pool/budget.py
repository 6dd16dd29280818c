"""The memory budget and least-recently-used eviction, decided BEFORE a model loads.

A model's cost comes from its backend class (`estimate(spec, path)`: its GGUF header and its
registry entry, capibara6/gguf_header.py) before it loads; once loaded, the first instance is
charged `backend.memory_bytes()`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Protocol

from ..types import ZERO_ESTIMATE

GIB = 1024**3
ZERO = ZERO_ESTIMATE


def physical_memory() -> int:
    """RAM this process may use: physical pages, capped by a cgroup v2 memory.max."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            total = min(total, int(limit))
    except (OSError, ValueError):
        pass
    return total


def budget_bytes(setting: float | str) -> int:
    """pool.memory_budget_gb as bytes; "auto" = 80% of RAM."""
    if setting == "auto":
        return int(physical_memory() * 0.8)
    return int(float(setting) * GIB)


class Candidate(Protocol):
    """What eviction needs to know about a model (implemented by the pool's slots)."""

    @property
    def evictable(self) -> bool: ...

    @property
    def last_used(self) -> float: ...

    @property
    def held_bytes(self) -> int: ...


def choose_victims(
    others: Iterable[Candidate], *, models_held: int, max_loaded: int, used: int, need: int, budget: int
) -> list[Candidate] | None:
    """Least-recently-used idle models to evict so a load of `need` bytes fits both caps.

    `models_held` (the loading model included) and `used` count everything held or reserved now.
    Returns [] when it fits already, None when even evicting every idle model would not do.
    """
    victims: list[Candidate] = []
    idle = sorted((c for c in others if c.evictable), key=lambda c: c.last_used)
    for c in [None, *idle]:
        if c is not None:
            victims.append(c)
            models_held -= 1
            used -= c.held_bytes
        if models_held <= max_loaded and used + need <= budget:
            return victims
    return None
