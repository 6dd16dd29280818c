"""A model worker's main: `python -m capibara6.workers.child IN_FD OUT_FD` (a fresh interpreter,
never a fork of the threaded server). IN_FD carries the server's messages, OUT_FD the worker's
(one socketpair per direction: see framing.py).

Invariants: the first message is `("load", 0, (model_id, spec, path, n_threads, cpus))`; the
worker pins itself to `cpus` (if any) before llama.cpp starts its threads, loads, and answers
`("ready", 0, (n_ctx, memory_bytes))` or `("fail", 0, exception)` and exits. Then every request
runs on its own thread (a batched instance serves several generations at once); writes to the
socket go through one lock. `("close", 0, None)` closes the backend and exits 0. EOF on the
socket (the server died) exits too, so a worker never outlives its server.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import sys
import threading
from multiprocessing.connection import Connection
from typing import Any

from ..threads import IdleThreads
from .framing import decode, encode, encode_token, pack_error
from .launch import finish_call

# Test seam: model ids (comma-separated) whose worker kills itself with SIGSEGV before loading,
# standing for a file that loads into a fault in llama.cpp.
CRASH_ON_LOAD_ENV = "CAPIBARA6_TEST_CRASH_ON_LOAD"

# Short calls answered on the reading thread: a thread start per call cost ~0.3 ms of a ~1 ms
# prepare round trip; generate and embed (long, cancellable) run on threads kept for reuse
# (IdleThreads: waking an idle one instead of starting one took ~0.1 ms off each TTFT).
INLINE_CALLS = frozenset({"prepare", "tokenize", "detokenize", "set_threads", "current_threads", "kv_cache_bytes"})


class Worker:
    def __init__(self, conn: Connection, out: Connection | None = None) -> None:
        self.conn = conn  # read by the main thread only
        self.out = out or conn  # written by every thread, under `lock`
        self.lock = threading.Lock()
        self.cancels: dict[int, threading.Event] = {}
        self.backend: Any = None
        self.threads = IdleThreads("worker-call")

    def send(self, data: bytes) -> None:
        with self.lock:
            self.out.send_bytes(data)

    def load(self, body: tuple[Any, ...]) -> None:
        from .. import crash
        from ..backends import backend_class

        model_id, spec, path, n_threads, cpus = body
        if cpus:
            os.sched_setaffinity(0, cpus)
        crash.install()
        if model_id in os.environ.get(CRASH_ON_LOAD_ENV, "").split(","):  # test seam: a load that faults
            os.kill(os.getpid(), signal.SIGSEGV)
        with crash.model_context(model_id):
            self.backend = backend_class(spec).load(model_id, spec, path, n_threads)
        self.send(encode("ready", 0, (self.backend.n_ctx, int(self.backend.memory_bytes()))))

    def generate(self, req: int, body: tuple[Any, ...], one_trip: bool = False) -> None:
        """`gen` (prepared, params), or with `one_trip` `pgen` (prompt, params, limits): prepared
        and its call finished here first (launch.py)."""
        from ..types import GenerationOutcome

        cancel = self.cancels[req]
        outcome = GenerationOutcome()
        try:
            if one_trip:
                prompt, params, limits = body
                prepared = self.backend.prepare(prompt)
                params = finish_call(prepared, params, self.backend.n_ctx, limits)
            else:
                prepared, params = body
            events = self.backend.generate(prepared, params, outcome, cancel)  # refusals raise here
            self.send(encode("acc", req))
            for ev in events:
                self.send(encode_token(req, ev))
            self.send(encode("done", req, dataclasses.asdict(outcome)))
        except BaseException as err:  # handed to the caller, raised there
            self.send(encode("err", req, pack_error(err)))
        finally:
            self.cancels.pop(req, None)

    def call(self, req: int, body: tuple[str, tuple[Any, ...], dict[str, Any]]) -> None:
        name, args, kwargs = body
        try:
            if name == "embed":
                args = (*args, self.cancels[req])
            result = getattr(self.backend, name)(*args, **kwargs)
            self.send(encode("ok", req, result))
        except BaseException as err:
            self.send(encode("err", req, pack_error(err)))
        finally:
            self.cancels.pop(req, None)

    def serve(self) -> int:
        op, _, body = decode(self.conn.recv_bytes())
        try:
            self.load(body)
        except BaseException as err:
            self.send(encode("fail", 0, pack_error(err)))
            return 1
        while True:
            try:
                op, req, body = decode(self.conn.recv_bytes())
            except (EOFError, OSError):
                return 0
            if op == "cancel":
                ev = self.cancels.get(req)
                if ev is not None:
                    ev.set()
            elif op == "close":
                self.backend.close()
                self.send(encode("ok", req, None))
                return 0
            elif op == "call" and body[0] in INLINE_CALLS:
                self.cancels[req] = threading.Event()
                self.call(req, body)
            else:
                self.cancels[req] = threading.Event()
                if op in ("gen", "pgen"):
                    self.threads.run(self.generate, req, body, op == "pgen")
                else:
                    self.threads.run(self.call, req, body)


def main(argv: list[str]) -> int:
    conns = [Connection(socket.socket(fileno=int(fd)).detach()) for fd in argv[1:3]]
    return Worker(*conns).serve()


if __name__ == "__main__":
    code = main(sys.argv)
    sys.stdout.flush()
    os._exit(code)  # no interpreter teardown racing llama.cpp's threads
