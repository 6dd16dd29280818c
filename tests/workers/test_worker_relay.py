"""A worker's token stream handed on by the reader thread (`relay`, what TokenStream uses) against
the same stream iterated, and `prepare_generate` (one round trip) against prepare + generate, on a
real worker (Gemma 3 270M, 1 thread); the reused threads (IdleThreads) behind TokenStream and the
worker's calls."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from capibara6.config import ModelSpec
from capibara6.errors import InvalidRequest
from capibara6.threads import IdleThreads
from capibara6.token_stream import TokenStream
from capibara6.types import ContextLengthExceeded, GenerationOutcome, Prepared, SamplingParams, TextPrompt, TokenEvent
from capibara6.workers.launch import CallLimits, finish_call
from capibara6.workers.proxy import WorkerBackend

PROMPT = "1, 2, 3, 4, 5, 6, 7, 8,"


@pytest.fixture(scope="module")
def worker(gemma_path: Path) -> Iterator[WorkerBackend]:
    spec = ModelSpec.model_validate({"source": {"path": str(gemma_path)}, "chat_format": "gemma", "n_ctx": 512, "n_threads": 1})
    w = WorkerBackend("gemma3-270m", spec, gemma_path, 1)
    yield w
    w.close()


def params(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, stop=())


def iterated(w: WorkerBackend, n: int) -> tuple[list[TokenEvent], GenerationOutcome]:
    outcome = GenerationOutcome()
    events = list(w.generate(w.prepare(TextPrompt(PROMPT)), params(n), outcome, threading.Event()))
    return events, outcome


def relayed(w: WorkerBackend, n: int, before: float = 0.0,
            cancel: threading.Event | None = None) -> tuple[list[TokenEvent], GenerationOutcome, set[int]]:
    """Relay a generation's tokens (after waiting `before` seconds, so some queue up first);
    returns them, the outcome and the threads `put` ran on."""
    outcome = GenerationOutcome()
    got: list[TokenEvent] = []
    threads: set[int] = set()

    def put(ev: TokenEvent) -> None:
        threads.add(threading.get_native_id())
        got.append(ev)

    stream = w.generate(w.prepare(TextPrompt(PROMPT)), params(n), outcome, cancel or threading.Event())
    time.sleep(before)
    stream.relay(put)
    return got, outcome, threads


def test_relay_hands_on_the_same_tokens_from_the_reader_thread(worker: WorkerBackend) -> None:
    want, want_outcome = iterated(worker, 24)
    got, outcome, threads = relayed(worker, 24)
    assert [(e.token_id, e.text) for e in got] == [(e.token_id, e.text) for e in want]
    assert outcome == want_outcome and outcome.completion_tokens == 24 and outcome.finish_reason == "length"
    assert worker._reader_tid in threads  # the reader put them (all but any that came before the switch)
    assert not worker._pending and not worker._sinks


def test_tokens_queued_before_the_switch_go_first_in_order(worker: WorkerBackend) -> None:
    want, _ = iterated(worker, 12)
    got, outcome, threads = relayed(worker, 12, before=1.0)  # 12 tokens take well under 1 s here
    assert [(e.token_id, e.text) for e in got] == [(e.token_id, e.text) for e in want]
    assert threading.get_native_id() in threads  # the early ones were handed on at the switch
    assert outcome.completion_tokens == 12


def test_cancel_stops_a_relay_and_hands_on_nothing_after_it(worker: WorkerBackend) -> None:
    cancel = threading.Event()
    got: list[TokenEvent] = []
    after: list[TokenEvent] = []

    def put(ev: TokenEvent) -> None:
        (after if cancel.is_set() else got).append(ev)
        if len(got) == 3:
            cancel.set()

    stream = worker.generate(worker.prepare(TextPrompt(PROMPT)), params(400), GenerationOutcome(), cancel)
    t0 = time.monotonic()
    stream.relay(put)
    assert len(got) == 3 and after == [] and time.monotonic() - t0 < 5
    assert not worker._pending and not worker._sinks
    events, _ = iterated(worker, 4)  # the instance is free again
    assert len(events) == 4


def test_a_stream_closed_before_it_starts_stops_the_worker(worker: WorkerBackend) -> None:
    stream = worker.generate(worker.prepare(TextPrompt(PROMPT)), params(400), GenerationOutcome(), threading.Event())
    t0 = time.monotonic()
    stream.close()
    assert time.monotonic() - t0 < 5 and not worker._pending
    events, outcome = iterated(worker, 4)  # would interleave with the first if it still ran
    assert len(events) == 4 and outcome.completion_tokens == 4


def test_token_stream_relays_a_worker_stream(worker: WorkerBackend) -> None:
    want, _ = iterated(worker, 16)

    async def main() -> list[TokenEvent]:
        def job(cancel: threading.Event) -> Any:
            return worker.generate(worker.prepare(TextPrompt(PROMPT)), params(16), GenerationOutcome(), cancel)

        stream = TokenStream(job)
        got = [ev async for ev in stream]
        await stream.aclose()
        return got

    assert [e.text for e in asyncio.run(main())] == [e.text for e in want]


def test_token_stream_closes_a_generator_left_early() -> None:
    closed = threading.Event()

    def events() -> Iterator[TokenEvent]:
        try:
            for i in range(10_000):
                yield TokenEvent(i, "x")
                time.sleep(0.001)
        finally:
            closed.set()

    async def main() -> int:
        stream = TokenStream(lambda cancel: events())
        n = 0
        async for _ in stream:
            n += 1
            if n == 3:
                break
        await stream.aclose()  # returns once the thread left the generator, its cleanup run
        return n

    assert asyncio.run(main()) == 3 and closed.is_set()


def test_idle_threads_reuse_a_finished_thread_and_run_calls_at_once() -> None:
    pool = IdleThreads("test", keep=2)
    seen: list[int] = []
    done = threading.Event()
    pool.run(lambda: (seen.append(threading.get_native_id()), done.set()))
    done.wait(5)
    wait_idle(pool, 1)
    done.clear()
    pool.run(lambda: (seen.append(threading.get_native_id()), done.set()))
    done.wait(5)
    assert seen[0] == seen[1]  # the same thread, woken
    # three calls that wait for each other can only finish if they run at the same time
    barrier = threading.Barrier(3, timeout=5)
    ran: list[int] = []
    finished = threading.Barrier(4, timeout=5)

    def meet() -> None:
        barrier.wait()
        ran.append(threading.get_native_id())
        finished.wait()

    wait_idle(pool, 1)
    for _ in range(3):
        pool.run(meet)
    finished.wait()
    assert len(set(ran)) == 3
    wait_idle(pool, 2)  # keep=2: the third thread exited
    time.sleep(0.05)
    assert pool.idle() == 2


def test_idle_threads_survive_a_failing_call() -> None:
    pool = IdleThreads("test", keep=1)
    pool.run(lambda: 1 / 0)
    wait_idle(pool, 1)
    done = threading.Event()
    pool.run(done.set)
    assert done.wait(5)


def wait_idle(pool: IdleThreads, n: int) -> None:
    deadline = time.monotonic() + 5
    while pool.idle() != n:
        assert time.monotonic() < deadline
        time.sleep(0.002)


def test_prepare_generate_is_prepare_then_generate_in_one_trip(worker: WorkerBackend) -> None:
    want, want_outcome = iterated(worker, 10)
    outcome = GenerationOutcome()
    limits = CallLimits(max_prompt_tokens=1000, max_tokens=10, max_tokens_cap=4096)
    got = list(worker.prepare_generate(TextPrompt(PROMPT), params(999), limits, outcome, threading.Event()))
    assert [(e.token_id, e.text) for e in got] == [(e.token_id, e.text) for e in want]
    assert outcome == want_outcome
    # the limits are applied in the worker, and its refusals raise at the call, as generate's
    with pytest.raises(InvalidRequest, match="the limit is 3") as err:
        worker.prepare_generate(TextPrompt(PROMPT), params(4), CallLimits(3, 4, 4096), GenerationOutcome(), threading.Event())
    assert err.value.param == "prompt"
    with pytest.raises(ContextLengthExceeded):
        worker.prepare_generate(TextPrompt(PROMPT), params(4), CallLimits(1000, 600, 4096), GenerationOutcome(), threading.Event())
    # max_tokens None: up to the context (n_ctx 512), capped
    capped = GenerationOutcome()
    n = len(list(worker.prepare_generate(TextPrompt(PROMPT), params(0), CallLimits(1000, None, 5),
                                         capped, threading.Event())))
    assert n == 5 and capped.finish_reason == "length"
    assert not worker._pending


def test_finish_call_adds_the_templates_stops_and_resolves_max_tokens() -> None:
    prepared = Prepared(TextPrompt("x"), (1, 2, 3), 3, ("<end>", "\n\n"))
    call = finish_call(prepared, SamplingParams(stop=("\n\n", "STOP")), 10, CallLimits(100, None, 4096))
    assert call.stop == ("\n\n", "STOP", "<end>") and call.max_tokens == 7  # the room left in n_ctx 10
    assert finish_call(prepared, SamplingParams(), 10, CallLimits(100, None, 4)).max_tokens == 4
    assert finish_call(prepared, SamplingParams(), 10, CallLimits(100, 50, 4)).max_tokens == 50  # the context check is generate's
    assert finish_call(Prepared(TextPrompt("x"), (1,) * 12, 12), SamplingParams(), 10, CallLimits(100, None, 4)).max_tokens == 1
    with pytest.raises(InvalidRequest):
        finish_call(prepared, SamplingParams(), 10, CallLimits(2, None, 4))
