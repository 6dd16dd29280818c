"""Core placement: each worker pinned to its own share of the CPUs the server may use.

Rules (the same as `n_threads: auto`, capibara6.threads): the CPUs are the server's affinity mask;
where there are more than two, one is kept for the HTTP side and never given to a worker (on 2
cores both go to workers: a worker per core is what keeps two models from spinning on the same
one, 55 -> 0.4 tok/s measured when they share). A worker asking for n threads gets n CPUs, taken
from the NUMA node with the most free CPUs so a worker fits inside one node when it can (nodes are
read from /sys/devices/system/node); CPUs already given to another worker are used only when no
free ones are left, the least shared first. `release` gives a worker's CPUs back. Each server
starts handing out at its own CPU (`first_cpu`, from its pid) and goes round from there, so servers
sharing a machine spread instead of all starting at CPU 0.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from ..threads import server_cpus

NODE_DIR = Path("/sys/devices/system/node")


def parse_cpulist(text: str) -> list[int]:
    """'0-3,8,10-11' -> [0, 1, 2, 3, 8, 10, 11]."""
    out: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def numa_nodes(root: Path = NODE_DIR) -> list[list[int]]:
    """CPUs of each NUMA node; [] when the machine does not say (then it is one node)."""
    nodes = []
    for d in sorted(root.glob("node[0-9]*"), key=lambda p: int(p.name[4:])):
        try:
            cpus = parse_cpulist((d / "cpulist").read_text())
        except (OSError, ValueError):
            continue
        if cpus:
            nodes.append(cpus)
    return nodes


def first_cpu(n: int, salt: int | None = None) -> int:
    """Where this server's placement starts among its `n` CPUs: its process id (or `salt`) modulo
    `n`, so servers sharing a machine (several sessions, a test run beside a benchmark) do not all pin their first
    worker to the lowest CPU (measured: a second server's worker on the same CPU 0 held a worker
    at 43-45 tok/s against 74-75 for direct generation)."""
    return (os.getpid() if salt is None else salt) % n if n > 0 else 0


class Placement:
    """Hands out CPU sets to workers. Touched from the event loop only (no lock)."""

    def __init__(
        self, cpus: list[int] | None = None, nodes: list[list[int]] | None = None, start: int | None = None
    ) -> None:
        """`start`: the index (in the server's CPUs) where handing out begins, the order wrapping
        around from there; None: `first_cpu` of this process."""
        allowed = sorted(cpus if cpus is not None else server_cpus())  # the server's mask at start
        self.http_cpu = allowed[-1] if len(allowed) > 2 else None
        self.cpus = [c for c in allowed if c != self.http_cpu]
        k = (first_cpu(len(self.cpus)) if start is None else start) % max(1, len(self.cpus))
        self.order = {c: (i - k) % len(self.cpus) for i, c in enumerate(self.cpus)}  # CPU -> its turn
        raw = nodes if nodes is not None else numa_nodes()
        mine = set(self.cpus)
        self.nodes = [[c for c in n if c in mine] for n in raw] or [self.cpus]
        self.nodes = [n for n in self.nodes if n] or [self.cpus]
        self.given: dict[str, tuple[int, ...]] = {}

    def _use(self) -> Counter[int]:
        use: Counter[int] = Counter({c: 0 for c in self.cpus})
        for cpus in self.given.values():
            use.update(cpus)
        return use

    def assign(self, key: str, n: int) -> tuple[int, ...]:
        """`n` CPUs for the worker `key`: free ones in one node first, then the least shared."""
        n = max(1, min(n, len(self.cpus)))
        use = self._use()
        turn = self.order.__getitem__
        # the node with the most free CPUs; on a tie, the one whose first CPU comes first in turn
        node = max(self.nodes, key=lambda nd: (sum(use[c] == 0 for c in nd), -min(map(turn, nd))))
        free_here = sorted((c for c in node if use[c] == 0), key=turn)
        rest = sorted((c for c in self.cpus if c not in free_here), key=lambda c: (use[c], turn(c)))
        chosen = tuple(sorted((free_here + rest)[:n]))
        self.given[key] = chosen
        return chosen

    def release(self, key: str) -> None:
        self.given.pop(key, None)

    def describe(self) -> dict[str, object]:
        return {
            "cpus": self.cpus,
            "http_cpu": self.http_cpu,
            "numa_nodes": self.nodes,
            "first_cpu": min(self.cpus, key=self.order.__getitem__) if self.cpus else None,
            "workers": {k: list(v) for k, v in self.given.items()},
        }
