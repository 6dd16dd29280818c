"""Model workers: each loaded model instance in its own process (issue 15).

- `framing`: the wire format between the server and a worker (stated there).
- `child`: the worker's main (`python -m capibara6.workers.child FD`), a fresh interpreter.
- `proxy`: `WorkerBackend`, the parent-side Backend that forwards the contract calls.
- `placement`: which CPUs each worker is pinned to.
"""

from .proxy import WorkerBackend, WorkerCrashed

__all__ = ["WorkerBackend", "WorkerCrashed"]
