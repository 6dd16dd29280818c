"""A fatal signal leaves a last log line naming the model (capibara6/crash.py, capibara6/kernels/src/crash.c).

Every crash happens in a child process, never in the test runner: a scripted program faults for
real (a NULL read), aborts, or is sent a signal, and the test reads what it left on stderr. The
model-context seams (TokenStream, the scheduler thread, pool loads) are checked in process.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator
from typing import Sequence as Seq

import httpx
import pytest

from capibara6 import crash, kernels
from capibara6.backends.llamacpp.scheduler import Scheduler, SeqState
from capibara6.config import parse_registry
from capibara6.pool import ModelPool
from capibara6.token_stream import TokenStream
from capibara6.types import Estimate, SamplingParams, TokenEvent
from tests.conftest import gemma_registry
from tests.fakes import FakeBackendBase
from tests.serverproc import ROOT, ServerProcess

# The child: install() as `capibara6 serve` does, then die the way argv[1] says in a worker
# thread that runs "crashy-model" (or, for "nomodel", on the main thread once the worker is done).
CHILD = r"""
import ctypes, os, signal, sys, threading
from capibara6 import crash

crash.install()
how = sys.argv[1]

def backend_call():
    with crash.model_context("crashy-model"):
        if how == "fault":
            ctypes.string_at(0)  # a real SIGSEGV: the kernel raises it for this instruction
        elif how == "abort":
            os.abort()  # SIGABRT by raise(): sent, not a fault
        elif how == "sent":
            signal.pthread_kill(threading.get_ident(), signal.SIGSEGV)  # SIGSEGV sent to this thread

worker = threading.Thread(target=backend_call)
worker.start()
worker.join()
if how == "nomodel":
    ctypes.string_at(0)
print("survived", flush=True)
"""


def run_child(how: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", CHILD, how], cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
    )


def crash_record(stderr: str) -> tuple[dict[str, Any], str]:
    """The capibara6.crash JSON line and everything written after it."""
    for i, line in enumerate(stderr.splitlines()):
        if line.startswith("{") and '"capibara6.crash"' in line:
            return json.loads(line), "\n".join(stderr.splitlines()[i + 1:])
    raise AssertionError(f"no capibara6.crash line in:\n{stderr}")


@pytest.mark.parametrize(
    ("how", "sig", "fault_name"),
    [("fault", signal.SIGSEGV, "Segmentation fault"), ("abort", signal.SIGABRT, "Aborted"),
     ("sent", signal.SIGSEGV, "Segmentation fault")],
)
def test_fatal_signal_in_a_model_thread_names_the_model(how: str, sig: signal.Signals, fault_name: str) -> None:
    r = run_child(how)
    assert r.returncode == -sig, (r.returncode, r.stderr)  # still dies by the signal: systemd restarts it
    assert "survived" not in r.stdout
    rec, after = crash_record(r.stderr)
    assert rec["level"] == "critical" and rec["logger"] == "capibara6.crash"
    assert rec["msg"] == f"fatal signal {sig.name} in model crashy-model"
    assert rec["model"] == "crashy-model" and rec["model_from"] == "thread" and rec["signal"] == sig.name
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", rec["ts"]), rec["ts"]
    assert rec["pid"] > 0 and rec["threads_in_model"] == 1
    if how == "fault":
        assert rec["code"] > 0 and rec["addr"] == "0x0"  # a kernel fault at address 0
    else:
        assert rec["code"] <= 0 and "addr" not in rec  # sent by raise()/tgkill
    # faulthandler's tracebacks follow the line: same thread, the backend call on its stack
    assert f"Fatal Python error: {fault_name}" in after, after
    assert f"Current thread {rec['thread']} (most recent call first)" in after, after
    assert "in backend_call" in after


def test_fault_on_a_thread_without_a_model_names_the_last_model() -> None:
    """e.g. one of llama.cpp's worker threads: the line names the last model set, and says so."""
    r = run_child("nomodel")
    assert r.returncode == -signal.SIGSEGV, r.stderr
    rec, after = crash_record(r.stderr)
    assert rec["msg"] == "fatal signal SIGSEGV in a thread running no model; last model set: crashy-model"
    assert rec["model"] == "crashy-model" and rec["model_from"] == "last" and rec["threads_in_model"] == 0
    assert "Fatal Python error: Segmentation fault" in after


def test_fault_before_any_model_says_so() -> None:
    r = subprocess.run(
        [sys.executable, "-c", "import ctypes; from capibara6 import crash; crash.install(); ctypes.string_at(0)"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert r.returncode == -signal.SIGSEGV
    rec, after = crash_record(r.stderr)
    assert rec["msg"] == "fatal signal SIGSEGV outside any model" and rec["model"] is None
    assert rec["model_from"] == "none" and "Fatal Python error: Segmentation fault" in after


def test_line_escapes_odd_ids_and_cuts_long_ones() -> None:
    """The id is JSON-escaped by the handler; ids over 127 bytes are cut at a UTF-8 boundary."""
    out: dict[str, Any] = {}

    def run() -> None:
        with crash.model_context('a"b\\c\nd'):
            out["odd"] = json.loads(kernels.crash_line(signal.SIGILL))
        with crash.model_context("é" * 100):  # 200 bytes
            out["long"] = json.loads(kernels.crash_line(signal.SIGFPE, 1, 0xDEAD))

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert out["odd"]["model"] == 'a"b\\c\nd' and out["odd"]["signal"] == "SIGILL"
    assert out["long"]["model"] == "é" * 63 and out["long"]["addr"] == "0xdead"


def test_model_context_is_per_thread_nests_and_clears() -> None:
    seen: dict[str, Any] = {}

    def run() -> None:
        seen["before"] = crash.current_model()
        with crash.model_context("outer"):
            with crash.model_context("inner"):
                seen["inner"] = crash.current_model()
            seen["outer"] = crash.current_model()
            seen["from_thread"] = kernels.crash_model()
        seen["after"] = crash.current_model()
        seen["fallback"] = kernels.crash_model()  # nothing of its own: the last one any thread set

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert seen["before"] is None and seen["inner"] == "inner" and seen["outer"] == "outer"
    assert seen["from_thread"] == ("outer", "thread")
    assert seen["after"] is None and seen["fallback"] == ("outer", "last")


# -- the seams: every thread that runs a model's native code runs inside its context ------------

def test_token_stream_runs_its_job_inside_the_model_context() -> None:
    async def main() -> list[str | None]:
        def job(cancel: threading.Event) -> Iterator[TokenEvent]:
            yield TokenEvent(1, str(crash.current_model()))

        stream = TokenStream(job, model="stream-model")
        texts = [ev.text async for ev in stream]
        await stream.aclose()
        return texts

    assert asyncio.run(main()) == ["stream-model"]


class _RecordingDecoder:
    """One decode per sequence, then end-of-generation; records the decoding thread's model."""

    n_cells = 64

    def __init__(self) -> None:
        self.models: list[str | None] = []

    def decode(self, tokens: Seq[int], pos: Seq[int], seq_ids: Seq[int], logits: Seq[bool]) -> None:
        self.models.append(crash.current_model())

    def sample(self, sampler: Any, index: int) -> int:
        return 0

    def logprobs(self, index: int, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
        return 0.0, []

    def is_eog(self, token: int) -> bool:
        return True

    def seq_rm(self, seq_id: int, p0: int, p1: int) -> None:
        pass

    def seq_cp(self, src: int, dst: int, p0: int, p1: int) -> None:
        pass

    def free_sampler(self, sampler: Any) -> None:
        pass


def test_scheduler_thread_runs_in_the_model_it_was_built_for() -> None:
    """Built inside a load (the pool's context), the scheduler's decodes name that model."""
    decoder = _RecordingDecoder()
    with crash.model_context("batched-model"):
        sched = Scheduler(decoder, n_slots=1, prefill_chunk=16)
    try:
        seq = SeqState([1, 2, 3], SamplingParams(max_tokens=4))
        sched.submit(seq)
        deadline = time.monotonic() + 10
        while not seq.done and time.monotonic() < deadline:
            time.sleep(0.01)
        assert seq.done
    finally:
        sched.close()
    assert sched.model_id == "batched-model" and decoder.models == ["batched-model"]


def test_pool_loads_warms_and_closes_inside_the_model_context() -> None:
    calls: list[tuple[str, str | None]] = []

    class Backend(FakeBackendBase):
        model_id = "m"
        n_ctx = 64

        def tokenize(self, text: str, *, add_bos: bool = True) -> list[int]:
            return [1]

        def generate(self, prompt: Any, params: Any, outcome: Any, cancel: Any) -> Iterator[TokenEvent]:
            calls.append(("generate", crash.current_model()))
            yield TokenEvent(1, "x")

        def memory_bytes(self) -> int:
            return 1

        def close(self) -> None:
            calls.append(("close", crash.current_model()))

    def loader(model_id: str, spec: Any, n_threads: int) -> Backend:
        calls.append(("load", crash.current_model()))
        return Backend()

    raw = {"models": {"m": {"source": {"path": "/nonexistent/m.gguf"}}}, "pool": {"warmup": ["m"]}}
    pool = ModelPool(parse_registry(raw), loader, estimator=lambda mid, spec: Estimate(1, 0, 0), memory_budget=10**9)

    async def main() -> None:
        assert await pool.warmup() == {"m": None}
        await pool.close()

    asyncio.run(main())
    assert calls == [("load", "m"), ("generate", "m"), ("close", "m")]


# -- the real server ------------------------------------------------------------------------------

def test_real_server_killed_by_a_fatal_signal_leaves_the_line(gemma_path: Path, tmp_path: Path) -> None:
    """`capibara6 serve` installs the handler: SIGSEGV sent while a stream decodes leaves the line
    (on the thread the kernel picks: the event loop's, so the model is the last one set, with one
    thread inside it: the stream's) and the process dies by the signal."""
    proc = ServerProcess(gemma_registry(gemma_path), tmp_path).wait_healthy()
    try:
        body = {"model": "gemma3-270m", "prompt": "Once upon a time", "max_tokens": 400, "temperature": 0}
        with httpx.stream("POST", proc.url["streaming"] + "/v1/completions", json=body, timeout=60) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()
            while not next(lines).startswith("data: {"):  # a token: the stream's thread is decoding
                pass
            os.kill(proc.proc.pid, signal.SIGSEGV)
            assert proc.proc.wait(30) == -signal.SIGSEGV
    finally:
        proc.stop()
    rec, after = crash_record(proc.log.read_text())
    assert rec["model"] == "gemma3-270m" and rec["signal"] == "SIGSEGV"
    assert rec["model_from"] in ("thread", "last") and rec["threads_in_model"] >= 1
    assert "Fatal Python error: Segmentation fault" in after
