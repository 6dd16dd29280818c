"""Model pool: every model access goes through `pool.lease(model_id)`.

State machine per model (`status()`; the value /v1/models shows):

    unloaded --first lease / warmup / admin load--> loading --ok--> ready <--> busy (N leases)
       ^                                               |                  |
       |                                         fails: waiters 503,     idle_unload_s after the last
       |                                         back to unloaded        lease, LRU eviction (caps),
       +------------------- unloading <--------------------------------- admin unload, shutdown

- Single flight: one load task per model; every request that arrives meanwhile waits in the
  model's bounded FIFO (`max_queue`, 429 past it; `queue_timeout_s`, 503 past it).
- `parallel` leases per model: on one batching instance (backend `max_concurrency` > 1) or on up
  to `parallel` instances loaded on demand; CPU threads are split between them.
- Caps: `pool.max_loaded` models and `pool.memory_budget_gb` estimated bytes. A load that would
  pass a cap first evicts least-recently-used idle models; a busy model is never evicted; if
  nothing can go, the load waits (the requests stay queued) until a model goes idle.
- Idle unload: the clock starts when the last lease ends, so a long stream is never cut.
- Unloading really frees memory: backend.close(), references dropped, gc, malloc_trim.

Modules: `slots` (per-model state and instances), `queue` (waiters), `budget` (estimates, LRU
choice), `pool` (the facade and the tasks that load, unload and reap).
"""

from ..errors import ModelBusy
from ..types import Estimate
from .pool import ModelPool, warm_generate

__all__ = ["Estimate", "ModelBusy", "ModelPool", "warm_generate"]
