"""One way to construct llama-cpp-python objects in this process.

With verbose=False, llama-cpp-python silences llama.cpp by dup2-ing /dev/null over fds 1 and 2 and
restoring them afterwards. That is process-wide and not thread-safe: two loads at once (the pool
loads in worker threads, e.g. three consensus experts on a first request) can restore the wrong
descriptors and leave stdout/stderr on /dev/null for good, losing every log line after it.
"""

from __future__ import annotations

import threading
from typing import Any

_LOAD_LOCK = threading.Lock()


def new_llama(**kwargs: Any) -> Any:
    """`llama_cpp.Llama(**kwargs)`, one construction at a time."""
    from llama_cpp import Llama

    with _LOAD_LOCK:
        return Llama(**kwargs)
