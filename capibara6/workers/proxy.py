"""`WorkerBackend`: the Backend contract, forwarded to a model worker process (child.py).

One connection per worker, multiplexed by request id: a reader thread in the server decodes every
frame and hands it to the waiting request's queue, so a batched worker streams several
generations at once; a relaying stream's tokens (TokenStream's) it hands to the event loop
itself (`_WorkerStream.relay`: no hop through the stream's thread). A generation's prompt goes
with it in one message (`prepare_generate`: prepared, its call finished and generated in the
worker), so one round trip comes before the prefill, not two. Cancellation: `generate` forwards the caller's `cancel` the moment it sees it
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
from typing import TYPE_CHECKING, Any, Callable, Generator, Sequence

import numpy as np

from ..errors import ModelCrashed
from ..threads import server_cpus
from ..types import GenerationOutcome, Pooling, Prepared, Prompt, SamplingParams, TokenEvent
from .framing import Message, decode, encode, unpack_error
from .launch import CallLimits

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
    relaying threads (the workers' readers, which hand a TokenStream's tokens to the event loop
    themselves, `_WorkerStream.relay`; and a stream's consuming thread when it is iterated instead)
    off the CPUs the workers are pinned to, when the server has CPUs no worker holds (on 2 CPUs with one 1-thread
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
            self._allowed = frozenset(server_cpus())  # the server's own mask, as it started
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

    def begin(self, hold: _Hold) -> None:
        """A relaying stream (tokens handed on by the reader itself) passed its first token:
        count it, so the readers keep off the workers' CPUs. Once per `hold`, never after `end`."""
        with self._lock:
            if hold.state != 0:
                return
            hold.state = 1
            self._streams += 1
            if self._streams == 1:
                self._apply()

    def end(self, hold: _Hold) -> None:
        with self._lock:
            counted, hold.state = hold.state == 1, 2
            if counted:
                self._streams -= 1
                if self._streams == 0:
                    self._apply()

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


class _Hold:
    """One relaying stream's share of `_Relays`: 0 not counted yet, 1 counted, 2 over."""

    __slots__ = ("state",)

    def __init__(self) -> None:
        self.state = 0


class _WorkerStream:
    """A worker generation's tokens: iterate it (the calling thread takes each token from the
    reader), or call `relay(put)` (TokenStream does): the reader thread hands each token to `put`
    itself, one thread hop less per token. Either way the end (`done`, an error, a crash) comes
    through this object, and `close()` (or leaving early) cancels the worker's generation and
    waits for it, so the instance is free when the lease returns."""

    def __init__(
        self, backend: WorkerBackend, req: int, q: queue.SimpleQueue[Message], outcome: GenerationOutcome,
        cancel: threading.Event,
    ) -> None:
        self._backend, self._req, self._q, self._outcome, self._cancel = backend, req, q, outcome, cancel
        self._gen: Generator[TokenEvent, None, None] | None = None
        self._used = False

    def __iter__(self) -> _WorkerStream:
        return self

    def __next__(self) -> TokenEvent:
        if self._gen is None:
            assert not self._used, "relay() took this stream"
            self._used = True
            self._gen = self._backend._stream(self._req, self._q, self._outcome, self._cancel)
        return next(self._gen)

    def relay(self, put: Callable[[TokenEvent], None]) -> None:
        """Hand every token to `put` (called on the reader thread) and return at the stream's end;
        its error or crash raises here."""
        assert not self._used, "this stream is being iterated"
        self._used = True
        self._backend._relay(self._req, self._q, self._outcome, self._cancel, put)

    def close(self) -> None:
        if self._gen is not None:
            self._gen.close()
        elif not self._used:  # never started: stop the worker's generation all the same
            self._used = True
            self._backend._forget(self._req, self._q, stop=True)


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
        self._sinks: dict[int, Callable[[TokenEvent], None]] = {}  # relaying streams' token sinks
        self._sink_lock = threading.Lock()
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
            if msg[0] == "tok":
                with self._sink_lock:  # a stream switching to relay drains its queue under it
                    sink = self._sinks.get(msg[1])
                    if sink is not None:
                        sink(msg[2])
                        continue
                    q = self._pending.get(msg[1])
                    if q is not None:
                        q.put(msg)
                continue
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
    ) -> _WorkerStream:
        """As the contract asks, refusals (ContextLengthExceeded ...) raise here, at the call: the
        worker answers `acc` once its backend's generate accepted the prompt, before prefill."""
        return self._start("gen", (prepared, params), outcome, cancel)

    def prepare_generate(
        self, prompt: Prompt, params: SamplingParams, limits: CallLimits, outcome: GenerationOutcome,
        cancel: threading.Event,
    ) -> _WorkerStream:
        """`prepare`, `finish_call` and `generate` in one message: the worker runs all three and
        the prefill follows at once, one round trip before the first token instead of two.
        Refusals (the prompt's, the limits', the context's) raise here, as from `generate`."""
        return self._start("pgen", (prompt, params, limits), outcome, cancel)

    def _start(self, op: str, body: Any, outcome: GenerationOutcome, cancel: threading.Event) -> _WorkerStream:
        req, q = self._open(op, body)
        try:
            op, _, body = q.get()
        except BaseException:
            self._send_cancel(req)
            self._pending.pop(req, None)
            raise
        if op != "acc":
            self._pending.pop(req, None)
            raise self._crashed(body) if op == "crash" else unpack_error(body)
        return _WorkerStream(self, req, q, outcome, cancel)

    def _stream(
        self, req: int, q: queue.SimpleQueue[Message], outcome: GenerationOutcome, cancel: threading.Event
    ) -> Generator[TokenEvent, None, None]:
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
                    continue
                finished = True
                self._end(op, body, outcome)
                return
        finally:
            self._forget(req, q, stop=not finished, cancel_sent=sent_cancel)
            _relays.unpin_caller(pinned)

    def _relay(
        self, req: int, q: queue.SimpleQueue[Message], outcome: GenerationOutcome, cancel: threading.Event,
        put: Callable[[TokenEvent], None],
    ) -> None:
        """`_stream` with the tokens handed to `put` by the reader thread as they arrive (no hop
        through this thread); this thread waits for the end, forwarding `cancel`. Tokens that came
        before the switch go first, in order; none goes out once `cancel` is set."""
        hold = _Hold()
        count = 0

        def sink(ev: TokenEvent) -> None:  # on the reader thread
            nonlocal count
            if cancel.is_set():
                return
            put(ev)
            count += 1
            if count == 2:  # from the second token on, as _stream: the relaying thread is the reader now
                _relays.begin(hold)

        early: list[Message] = []
        with self._sink_lock:
            while True:
                try:
                    early.append(q.get_nowait())
                except queue.Empty:
                    break
            while early and early[0][0] == "tok":
                sink(early.pop(0)[2])
            self._sinks[req] = sink
        sent_cancel = False
        finished = False
        try:
            while True:
                if cancel.is_set() and not sent_cancel:
                    self._send_cancel(req)
                    sent_cancel = True
                if early:
                    op, _, body = early.pop(0)
                else:
                    try:
                        op, _, body = q.get(timeout=CANCEL_POLL_S)
                    except queue.Empty:
                        continue
                finished = True
                self._end(op, body, outcome)
                return
        finally:
            self._forget(req, q, stop=not finished, cancel_sent=sent_cancel)  # drained before the sink goes
            with self._sink_lock:
                self._sinks.pop(req, None)
            _relays.end(hold)

    def _forget(self, req: int, q: queue.SimpleQueue[Message], *, stop: bool, cancel_sent: bool = False) -> None:
        """A stream is over for its consumer. With `stop` (it walked away before the end) the
        worker's generation is cancelled and waited for, so the instance is free when the lease
        returns; then the request's queue goes."""
        if stop:
            if not cancel_sent:
                self._send_cancel(req)
            self._drain(q)
        self._pending.pop(req, None)

    def _end(self, op: str, body: Any, outcome: GenerationOutcome) -> None:
        """A stream's last frame: `done` fills `outcome`, the rest raise."""
        if op == "done":
            for f in fields(GenerationOutcome):
                setattr(outcome, f.name, body[f.name])
            return
        if op == "crash":
            raise self._crashed(body)
        raise unpack_error(body)

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
