"""`WorkerBackend`: the Backend contract, forwarded to a model worker process (child.py).

One connection per worker, multiplexed by request id: a reader thread in the server decodes every
frame and hands it to the waiting request's queue, so a batched worker streams several
generations at once. Cancellation: `generate` forwards the caller's `cancel` the moment it sees it
set (it checks between tokens and every CANCEL_POLL_S while waiting for one), and the worker sets
its own event, which the backend checks between tokens: it stops within a token or two.

A dead worker (EOF on the socket) fails every request in flight with ModelCrashed (503
model_crashed) naming how it died, and calls `on_crash(reason)` once.
"""

from __future__ import annotations

import itertools
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import fields
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np

from ..errors import ModelCrashed
from ..types import GenerationOutcome, Pooling, Prepared, Prompt, SamplingParams, TokenEvent
from .framing import Message, decode, encode, unpack_error

if TYPE_CHECKING:
    from ..config import ModelSpec

CANCEL_POLL_S = 0.02  # how often a generation waiting for its next token looks at `cancel`
CLOSE_WAIT_S = 10.0  # close(): how long a worker may take to exit before it is killed
STATS_WAIT_S = 1.0  # kv_cache_bytes(): longest wait for a worker's answer

WorkerCrashed = ModelCrashed


def _rss_bytes(pid: int) -> int:
    """Resident bytes of a process (VmRSS in /proc/PID/status); 0 once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def exit_reason(code: int | None) -> str:
    if code is None:
        return "its worker stopped answering"
    if code < 0:
        try:
            return f"its worker was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"its worker was killed by signal {-code}"
    return f"its worker exited with status {code}"


class _Relays:
    """While a worker stream relays tokens (from its second token to its end), keeps the server's
    relaying threads (the workers' readers, and that stream's consuming thread) off the CPUs the
    workers are pinned to, when the server has CPUs no worker holds (on 2 CPUs with one 1-thread
    worker: the other CPU); the rest of the time (a prompt's round trips, prefill, the first token,
    idle) they run anywhere: pinning migrates the event loop, and done while the first token was
    on its way it delayed it (TTFT through the worker +4 to +18 ms at the median on a loaded box,
    pinning from the first token vs not pinning, alternated in one run). Unpinned, the scheduler put them on
    the worker's CPU often enough to matter: over a 128-token stream the worker's generating thread
    was preempted 2-3 times a token and waited 0.4-9 ms a token in the run queue (direct
    llama.cpp: 0.02-0.4 times, 0.001-0.2 ms, same window; /proc/TID/schedstat). With no free CPU
    (the workers hold them all) they run anywhere, as before.

    The event loop (the main thread; ~0.65 ms of CPU a streamed token) is left to float. It costs
    the worker most when it lands on its CPU (perf sched_switch on a 2-CPU box: up to 152
    preemptions of the worker in a 128-token stream), and pinning it too (2-CPU servers only, as
    threads it starts inherit its mask and `n_threads: auto` counts that mask) removed them, but
    TTFT through the worker measured worse with it on a loaded box (medians 28-56 ms vs 20-37 ms,
    alternated in one run), so it was taken out; see docs/workers.md."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[int, tuple[tuple[int, ...], int]] = {}  # id(worker) -> (its CPUs, reader tid)
        self._allowed: frozenset[int] | None = None
        self._streams = 0  # worker streams relaying now

    def _free(self) -> set[int] | None:
        """The CPUs no worker holds (None: there are none, or no affinity API)."""
        if self._allowed is None:
            try:  # the main thread's mask (the event loop's, before any pinning here): the server's own
                self._allowed = frozenset(os.sched_getaffinity(os.getpid()))
            except (AttributeError, OSError):
                self._allowed = frozenset()
        free = set(self._allowed).difference(*(cpus for cpus, _ in self._held.values()))
        return free or None

    def _apply(self) -> None:
        mask = (self._free() or self._allowed) if self._streams else self._allowed
        for _, tid in self._held.values():
            _set_affinity(tid, mask)

    def hold(self, worker: WorkerBackend, reader_tid: int) -> None:
        with self._lock:
            self._held[id(worker)] = (worker.cpus, reader_tid)
            self._apply()

    def release(self, worker: WorkerBackend) -> None:
        with self._lock:
            if self._held.pop(id(worker), None) is not None:
                self._apply()

    def pin_caller(self) -> tuple[int, frozenset[int]] | None:
        """A worker stream starts relaying on the calling thread: pin it to the free CPUs. Returns
        (its tid, its previous mask) for `unpin_caller`, None when it was left as it was."""
        try:
            tid = threading.get_native_id()
            prev = frozenset(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            return None
        with self._lock:
            free = self._free()
            if free is None or not _set_affinity(tid, free):
                return None
            self._streams += 1
            if self._streams == 1:
                self._apply()
        return tid, prev

    def unpin_caller(self, pinned: tuple[int, frozenset[int]] | None) -> None:
        """The stream ended: its thread gets its mask back (by tid: a generator may be closed from
        another thread), and the event loop its own once no worker stream is left."""
        if pinned is None:
            return
        _set_affinity(*pinned)
        with self._lock:
            self._streams -= 1
            if self._streams == 0:
                self._apply()


def _set_affinity(tid: int, cpus: set[int] | frozenset[int] | None) -> bool:
    if not cpus:
        return False
    try:
        os.sched_setaffinity(tid, cpus)
        return True
    except (AttributeError, OSError):  # not Linux, a CPU gone offline, the thread gone
        return False


_relays = _Relays()


class WorkerBackend:
    """A loaded instance living in its own process. `memory_bytes` is the worker's RSS."""

    def __init__(
        self, model_id: str, spec: ModelSpec, path: Path | None, n_threads: int,
        cpus: Sequence[int] = (), on_crash: Callable[[str], None] | None = None,
    ) -> None:
        self.model_id = model_id
        self.cpus = tuple(cpus)
        self.on_crash = on_crash
        self.n_ctx = 0
        self._ids = itertools.count(1)
        self._pending: dict[int, queue.SimpleQueue[Message]] = {}
        self._lock = threading.Lock()
        self._dead: str | None = None
        self._closing = False
        self._last_kv = 0
        down, down_child = socket.socketpair()  # server -> worker
        up, up_child = socket.socketpair()  # worker -> server
        env = dict(os.environ)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "capibara6.workers.child", str(down_child.fileno()), str(up_child.fileno())],
            pass_fds=(down_child.fileno(), up_child.fileno()), env=env,
        )
        down_child.close()
        up_child.close()
        self.conn = Connection(down.detach())  # written under no lock: send_bytes is one sendall
        self.events = Connection(up.detach())  # read by the reader thread only
        self.pid = self.proc.pid
        try:
            self.conn.send_bytes(encode("load", 0, (model_id, spec, path, n_threads, self.cpus)))
            op, _, body = decode(self.events.recv_bytes())
        except (EOFError, OSError):
            self.proc.wait()
            self._close_conns()
            raise ModelCrashed(f"Model '{model_id}' crashed while loading: {exit_reason(self.proc.returncode)}.") from None
        if op == "fail":
            self.proc.wait()
            self._close_conns()
            raise unpack_error(body)
        self.n_ctx, self._loaded_bytes = body
        self._reader_tid = 0
        self._reader = threading.Thread(target=self._read, name=f"worker-{model_id}", daemon=True)
        self._reader.start()

    # -- plumbing ---------------------------------------------------------------------------

    def _close_conns(self) -> None:
        self.conn.close()
        self.events.close()

    def _read(self) -> None:
        self._reader_tid = threading.get_native_id()
        _relays.hold(self, self._reader_tid)
        try:
            self._read_frames()
        finally:
            _relays.release(self)

    def _read_frames(self) -> None:
        while True:
            try:
                msg = decode(self.events.recv_bytes())
            except (EOFError, OSError):
                break
            q = self._pending.get(msg[1])
            if q is not None:
                q.put(msg)
        try:
            code = self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = None
        reason = exit_reason(code)
        with self._lock:
            self._dead = reason
            pending = list(self._pending.values())
        for q in pending:
            q.put(("crash", 0, reason))
        if not self._closing and self.on_crash is not None:
            self.on_crash(reason)

    def _crashed(self, reason: str) -> ModelCrashed:
        return ModelCrashed(f"Model '{self.model_id}' crashed: {reason}.")

    def _open(self, op: str, body: Any) -> tuple[int, queue.SimpleQueue[Message]]:
        req = next(self._ids)
        q: queue.SimpleQueue[Message] = queue.SimpleQueue()
        with self._lock:
            if self._dead is not None:
                raise self._crashed(self._dead)
            self._pending[req] = q
        try:
            self.conn.send_bytes(encode(op, req, body))
        except OSError:
            self._pending.pop(req, None)
            raise self._crashed(self._dead or "its connection broke") from None
        return req, q

    def _send_cancel(self, req: int) -> None:
        try:
            self.conn.send_bytes(encode("cancel", req))
        except OSError:
            pass

    def _call(self, name: str, *args: Any, cancel: threading.Event | None = None, **kwargs: Any) -> Any:
        req, q = self._open("call", (name, args, kwargs))
        try:
            while True:
                try:
                    op, _, body = q.get(timeout=CANCEL_POLL_S if cancel is not None else None)
                except queue.Empty:
                    if cancel is not None and cancel.is_set():
                        self._send_cancel(req)
                        cancel = None
                    continue
                if op == "ok":
                    return body
                if op == "crash":
                    raise self._crashed(body)
                raise unpack_error(body)
        finally:
            self._pending.pop(req, None)

    # -- the contract -----------------------------------------------------------------------

    def prepare(self, prompt: Prompt) -> Prepared:
        return self._call("prepare", prompt)

    def generate(
        self, prepared: Prepared, params: SamplingParams, outcome: GenerationOutcome, cancel: threading.Event
    ) -> Iterator[TokenEvent]:
        """As the contract asks, refusals (ContextLengthExceeded ...) raise here, at the call: the
        worker answers `acc` once its backend's generate accepted the prompt, before prefill."""
        req, q = self._open("gen", (prepared, params))
        try:
            op, _, body = q.get()
        except BaseException:
            self._send_cancel(req)
            self._pending.pop(req, None)
            raise
        if op != "acc":
            self._pending.pop(req, None)
            raise self._crashed(body) if op == "crash" else unpack_error(body)
        return self._stream(req, q, outcome, cancel)

    def _stream(
        self, req: int, q: queue.SimpleQueue[Message], outcome: GenerationOutcome, cancel: threading.Event
    ) -> Iterator[TokenEvent]:
        sent_cancel = False
        finished = False
        pinned: tuple[int, frozenset[int]] | None = None
        sent = 0  # tokens handed on; from the second on, keep off the workers' CPUs
        try:
            while True:
                if cancel.is_set() and not sent_cancel:
                    self._send_cancel(req)
                    sent_cancel = True
                try:
                    op, _, body = q.get(timeout=CANCEL_POLL_S)
                except queue.Empty:
                    continue
                if op == "tok":
                    yield body
                    sent += 1
                    if sent == 2:  # not while the first token is on its way: pinning the event
                        pinned = _relays.pin_caller()  # loop migrates it, which delayed it (TTFT)
                elif op == "done":
                    finished = True
                    for f in fields(GenerationOutcome):
                        setattr(outcome, f.name, body[f.name])
                    return
                elif op == "crash":
                    finished = True
                    raise self._crashed(body)
                else:
                    finished = True
                    raise unpack_error(body)
        finally:
            if not finished:  # the consumer walked away: stop the worker's generation and wait
                if not sent_cancel:  # for it, so the instance is free when the lease returns
                    self._send_cancel(req)
                self._drain(q)
            self._pending.pop(req, None)
            _relays.unpin_caller(pinned)

    def _drain(self, q: queue.SimpleQueue[Message]) -> None:
        """Wait (up to CLOSE_WAIT_S) for a cancelled generation's last frame."""
        deadline = time.monotonic() + CLOSE_WAIT_S
        while (left := deadline - time.monotonic()) > 0:
            try:
                op, _, _ = q.get(timeout=left)
            except queue.Empty:
                return
            if op != "tok":
                return

    def embed(
        self, prepared: Sequence[Prepared], pooling: Pooling, normalize: bool, cancel: threading.Event | None = None
    ) -> list[np.ndarray]:
        return self._call("embed", list(prepared), pooling, normalize, cancel=cancel or threading.Event())

    def tokenize(self, text: str, *, add_bos: bool = True) -> list[int]:
        return self._call("tokenize", text, add_bos=add_bos)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._call("detokenize", list(ids))

    def set_threads(self, n_threads: int) -> None:
        self._call("set_threads", n_threads)

    def current_threads(self) -> int | None:
        return self._call("current_threads")

    def kv_cache_bytes(self) -> int:
        """Asked of the worker with a STATS_WAIT_S limit (a /metrics scrape must never hang on a
        wedged worker): past it, the last answer."""
        try:
            req, q = self._open("call", ("kv_cache_bytes", (), {}))
        except ModelCrashed:
            return 0
        try:
            op, _, body = q.get(timeout=STATS_WAIT_S)
            if op == "ok":
                self._last_kv = int(body)
        except queue.Empty:
            pass
        finally:
            self._pending.pop(req, None)
        return self._last_kv

    def memory_bytes(self) -> int:
        """The worker's resident set, measured (0 once it is gone)."""
        return _rss_bytes(self.pid) if self._dead is None else 0

    @property
    def alive(self) -> bool:
        return self._dead is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send the worker a signal (tests, and close() past its wait)."""
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            pass

    def close(self) -> None:
        """Ask the worker to close and exit; kill it past CLOSE_WAIT_S. Process exit frees it all."""
        self._closing = True
        if self._dead is None:
            try:
                self.conn.send_bytes(encode("close", 0))
            except OSError:
                pass
        try:
            self.proc.wait(timeout=CLOSE_WAIT_S)
        except subprocess.TimeoutExpired:
            self.kill()
            self.proc.wait()
        self._reader.join(timeout=CLOSE_WAIT_S)
        self._close_conns()
