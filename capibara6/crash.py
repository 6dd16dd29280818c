"""The server never dies silently: a fatal signal leaves a last log line naming the model.

`install()` (once, at the start of `capibara6 serve`) enables `faulthandler` for every thread on
stderr, then puts a small C handler (capibara6/kernels/src/crash.c) in front of it for SIGSEGV, SIGBUS,
SIGILL, SIGFPE and SIGABRT. On a fatal signal the C handler writes one JSON line in the shape of
capibara6/logs.py's records, e.g.

    {"ts": "...", "level": "critical", "logger": "capibara6.crash",
     "msg": "fatal signal SIGSEGV in model gemma3-270m", "model": "gemma3-270m",
     "model_from": "thread", "signal": "SIGSEGV", "code": 1, "addr": "0x0", "pid": ..., "thread": "0x..."}

then hands the signal on to faulthandler, whose Python tracebacks follow, and the process dies by
that signal (so systemd's `Restart=on-failure` restarts it). Why a C handler: the fault this was
built for (llama.cpp's AMX matmul on an AMX-reporting Xeon VM, ldtilecfg) kills the process inside
native code, where no Python runs, and faulthandler alone names no model.

`model_context(id)` marks the calling thread as running that model (a C slot keyed by the thread;
entering and leaving costs ~7 us, measured on the 2-core dev box: paid once per generation, load or
close, never per token, where one decode takes milliseconds). A fault on a thread that
runs no model, such as one of llama.cpp's or our kernel pool's worker threads, names the last model
any thread set and says so (`"model_from": "last"`, with `threads_in_model` telling how many threads
run a model right now: with 1 the guess is the one).
"""

from __future__ import annotations

import faulthandler
import logging
import sys
from contextlib import contextmanager
from typing import Any, Iterator, TextIO

log = logging.getLogger("capibara6.crash")

try:  # the C side is part of our kernels; without them the log still gets faulthandler's dump
    from capibara6 import kernels as _kernels
except ImportError:  # pragma: no cover - a broken install; install() says so
    _kernels: Any = None  # type: ignore[no-redef]


def _fd(stream: TextIO) -> int:
    """The file descriptor behind `stream`, else 2 (a captured stream in tests has none)."""
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError):
        return 2


def install(stream: TextIO | None = None) -> bool:
    """Enable faulthandler (all threads) and the model-naming line on `stream` (default stderr,
    the log: journald and our JSON logs read it). Idempotent. Order matters: faulthandler first,
    so the C handler is in front and chains to it. Returns False when only faulthandler could be
    enabled (the kernels are not built)."""
    fd = _fd(stream or sys.stderr)
    faulthandler.enable(file=fd, all_threads=True)
    if _kernels is None:
        log.warning("kernels are not built: a fatal signal leaves faulthandler's tracebacks but no model id")
        return False
    _kernels.crash_install(fd)
    return True


def current_model() -> str | None:
    """The model id the calling thread runs (None: none set on this thread)."""
    if _kernels is None:
        return None
    model, source = _kernels.crash_model()
    return model if source == "thread" else None


def set_model(model_id: str | None) -> None:
    """Mark the calling thread as running `model_id` (None: nothing). Prefer `model_context`."""
    if _kernels is not None:
        _kernels.crash_set_model(model_id)


@contextmanager
def model_context(model_id: str | None) -> Iterator[None]:
    """While the block runs on this thread, a fatal signal here names `model_id`. Nests: the
    thread's previous model is restored afterwards (None is a no-op context)."""
    if model_id is None:
        yield
        return
    previous = current_model()
    set_model(model_id)
    try:
        yield
    finally:
        set_model(previous)


__all__ = ["current_model", "install", "model_context", "set_model"]
