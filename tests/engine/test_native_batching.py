"""Continuous batching on the native engine (backends/native_batched.py over engine/batch_runner.py
and engine/paged_kv.py) with the real Gemma 3 270M, requests from several threads at once.

The reference for every output is a FRESH single-sequence NativeBackend (its own Runner) per
prompt: a reused Runner keeps the previous sequence's prefix and FP8 key shift, so it is not a
clean reference. Batched greedy equals alone greedy token for token: every row takes its alone
kernel path and attention is per sequence over its own blocks (batch_runner.py's docstring).
"""

from __future__ import annotations

import math
import pathlib
import threading
import time
from typing import Any, Callable, Iterator

import numpy as np
import pytest

from capibara6.backends.native import NativeBackend
from capibara6.backends.native_batched import BLOCK, NativeBatchedBackend
from capibara6.config import ModelSpec
from capibara6.engine.runner import Runner
from capibara6.types import ChatPrompt, GenerationOutcome, SamplingParams, TextPrompt, TokenEvent

from .conftest import PD_TEXT

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "def fibonacci(n):",
    "The three primary colors are",
]


def load(path: pathlib.Path, *, parallel: int = 4, n_ctx: int = 256, kv: str = "fp8", **spec: Any) -> NativeBatchedBackend:
    s = ModelSpec(backend="native", source={"path": str(path)}, parallel=parallel, kv_cache=kv, n_ctx=n_ctx,
                  chat_format="gemma", **spec)
    return NativeBatchedBackend.load("gemma3-270m-native", s, path, 1)


@pytest.fixture
def make(gemma_gguf: pathlib.Path) -> Iterator[Callable[..., NativeBatchedBackend]]:
    """A fresh batched backend per test (closed after): no test sees another's cached prefixes."""
    made: list[NativeBatchedBackend] = []

    def _make(**kw: Any) -> NativeBatchedBackend:
        b = load(gemma_gguf, **kw)
        made.append(b)
        return b

    yield _make
    for b in made:
        b.close()


class Run:
    """One generation on its own thread (submitted at construction), recording its events."""

    def __init__(self, backend: Any, prompt: str | list[int] | ChatPrompt, **params: Any) -> None:
        self.params = SamplingParams(**{"max_tokens": 10, "temperature": 0.0, **params})
        self.outcome = GenerationOutcome()
        self.cancel = threading.Event()
        self.events: list[TokenEvent] = []
        self.error: BaseException | None = None
        if isinstance(prompt, ChatPrompt):
            prepared = backend.prepare(prompt)
            self.params = SamplingParams(**{**self.params.__dict__, "stop": prepared.stops})
        else:
            prepared = backend.prepare(TextPrompt(prompt)) if isinstance(prompt, str) else _ids(backend, prompt)
        self._gen = backend.generate(prepared, self.params, self.outcome, self.cancel)
        self.thread = threading.Thread(target=self._work, daemon=True)
        self.thread.start()

    def _work(self) -> None:
        try:
            for ev in self._gen:
                self.events.append(ev)
        except BaseException as err:  # noqa: BLE001 - reported by join
            self.error = err

    def join(self, timeout: float = 120) -> Run:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "generation did not finish"
        assert self.error is None, self.error
        return self

    @property
    def tokens(self) -> list[int]:
        return [e.token_id for e in self.events if e.token_id >= 0]

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events)


def _ids(backend: Any, ids: list[int]) -> Any:
    from capibara6.types import Prepared, TokenPrompt

    return Prepared(TokenPrompt(tuple(ids)), tuple(ids), len(ids))


def alone(gemma_model: Any, gemma_tokenizer: Any, prompt: str | list[int] | ChatPrompt, *, kv: str = "fp8", n_ctx: int = 256,
          **params: Any) -> Run:
    """The reference: a fresh single-sequence backend for this one prompt."""
    b = NativeBackend("alone", Runner(gemma_model, n_ctx=n_ctx, kv_cache=kv, ops="kernels"), gemma_tokenizer, "gemma")
    return Run(b, prompt, **params).join()


def together(backend: NativeBatchedBackend, prompts: list[Any], per: list[dict[str, Any]] | None = None, **params: Any) -> list[Run]:
    with backend.scheduler.hold():  # admitted at one step: they really share every step
        runs = [Run(backend, p, **{**params, **(per[i] if per else {})}) for i, p in enumerate(prompts)]
    return [r.join() for r in runs]


def wait_for(cond: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def live_blocks(b: NativeBatchedBackend, gi: int, seqs: list[int] | None = None) -> set[int]:
    kv = b.batch.kv
    ids = range(len(kv.seqs)) if seqs is None else seqs
    return {x for s in ids for x in kv.seqs[s].tables[gi] if x >= 0}


def assert_pools_consistent(b: NativeBatchedBackend) -> None:
    """Each pool's used blocks are exactly the blocks some table lists (nothing leaked)."""
    for gi, g in enumerate(b.batch.kv.groups):
        assert g.pool.n_used == len(live_blocks(b, gi)), (gi, g.pool.n_used)


def same_events(got: Run, want: Run) -> None:
    assert got.tokens == want.tokens
    assert got.text == want.text
    assert got.outcome.finish_reason == want.outcome.finish_reason
    assert got.outcome.completion_tokens == want.outcome.completion_tokens


# -- batched == alone ----------------------------------------------------------------------------


@pytest.mark.parametrize("kv", ["fp8", "fp32"])
def test_batched_greedy_equals_alone(make: Callable[..., NativeBatchedBackend], gemma_model: Any, gemma_tokenizer: Any,
                                     kv: str) -> None:
    """Four different prompts in one batch: each gets exactly its alone greedy tokens (so no
    sequence sees another's KV: no cross-talk)."""
    b = make(parallel=4, kv=kv)
    runs = together(b, PROMPTS, max_tokens=12)
    assert b.scheduler.peak_running == 4
    assert any(st.n_decode == 4 for st in b.scheduler.stats)  # four decode rows in one forward
    refs = [alone(gemma_model, gemma_tokenizer, p, kv=kv, max_tokens=12) for p in PROMPTS]
    for r, ref in zip(runs, refs):
        assert len(r.tokens) == 12 and r.outcome.finish_reason == "length"
        same_events(r, ref)
    assert len({tuple(r.tokens) for r in runs}) == 4


def test_seeded_sampling_equals_alone(make: Callable[..., NativeBatchedBackend], gemma_model: Any, gemma_tokenizer: Any) -> None:
    """Per-sequence samplers: seed, temperature, top-k/p, penalties over the sequence's own history."""
    b = make(parallel=4)
    per: list[dict[str, Any]] = [
        {"temperature": 0.9, "top_k": 40, "top_p": 0.95, "seed": 11},
        {"temperature": 1.0, "seed": 12},
        {"temperature": 0.8, "min_p": 0.05, "seed": 13, "repeat_penalty": 1.3},
        {"temperature": 1.0, "seed": 11},
    ]
    prompts = [PROMPTS[1], PROMPTS[1], PROMPTS[2], PROMPTS[3]]
    runs = together(b, prompts, per, max_tokens=10)
    refs = [alone(gemma_model, gemma_tokenizer, p, max_tokens=10, **kw) for p, kw in zip(prompts, per)]
    for r, ref in zip(runs, refs):
        same_events(r, ref)
    assert runs[0].tokens != runs[1].tokens  # same prompt, other sampler: another draw


# -- cancellation --------------------------------------------------------------------------------


def test_cancel_frees_blocks_at_once(make: Callable[..., NativeBatchedBackend]) -> None:
    b = make(parallel=4, n_ctx=512)
    kv = b.batch.kv
    done = Run(b, PROMPTS[0], max_tokens=6).join()
    wait_for(lambda: b.scheduler.running == 0)
    cached = [s for s in range(len(kv.seqs)) if kv.length(s) > 0]
    assert len(cached) == 1  # a finished sequence's KV stays as a prefix cache
    used_before = [g.pool.n_used for g in kv.groups]
    assert used_before[0] == -(-kv.length(cached[0]) // BLOCK) > 0
    assert done.outcome.finish_reason == "length"

    records: list[tuple[list[int], list[int], list[int]]] = []  # at each step (scheduler thread): lengths, used, live
    step = b.batch.step

    def spy(*a: Any, **k: Any) -> Any:
        records.append(([kv.length(s) for s in range(len(kv.seqs))], [g.pool.n_used for g in kv.groups],
                        [len(live_blocks(b, gi)) for gi in range(len(kv.groups))]))
        return step(*a, **k)

    b.batch.step = spy  # type: ignore[method-assign]
    keep = Run(b, PROMPTS[1], max_tokens=200)
    gone = Run(b, PROMPTS[2], max_tokens=200)
    wait_for(lambda: len(keep.events) >= 3 and len(gone.events) >= 3)
    owned = {i for i, sl in enumerate(b.scheduler._slots) if sl.owner is not None}
    assert len(owned) == 2 and cached[0] not in owned
    p2 = b.tokenize(PROMPTS[2])
    gone_slot = next(i for i in owned if b.scheduler._slots[i].tokens[: len(p2)] == p2)
    keep_slot = next(iter(owned - {gone_slot}))
    assert kv.length(gone_slot) > 0
    gone.cancel.set()
    wait_for(lambda: kv.length(gone_slot) == 0, timeout=2)  # within a step or two, not at the end
    gone.join()
    assert gone.outcome.finish_reason is None and keep.thread.is_alive()
    n = len(records)
    wait_for(lambda: len(records) >= n + 2, timeout=5)
    lengths, used, live = records[-1]  # a step while `keep` still runs
    assert [s for s, ln in enumerate(lengths) if ln > 0] == sorted([cached[0], keep_slot])
    assert used == live  # the cancelled sequence's blocks are back in the pools, nothing leaked
    assert all(t == [] for t in kv.seqs[gone_slot].tables)

    # closing the iterator (a client that goes away) frees the other stream's blocks too
    keep.cancel.set()
    keep.join()
    wait_for(lambda: b.scheduler.running == 0, timeout=2)
    wait_for(lambda: [g.pool.n_used for g in kv.groups] == used_before, timeout=2)
    assert [s for s in range(len(kv.seqs)) if kv.length(s) > 0] == cached
    assert_pools_consistent(b)


def test_closing_the_iterator_frees_blocks_at_once(make: Callable[..., NativeBatchedBackend]) -> None:
    b = make(parallel=2, n_ctx=512)
    kv = b.batch.kv
    it: Any = b.generate(b.prepare(TextPrompt(PROMPTS[1])), SamplingParams(max_tokens=200, temperature=0.0), GenerationOutcome(),
                    threading.Event())
    for _ in range(3):
        next(it)
    assert sum(g.pool.n_used for g in kv.groups) > 0
    it.close()  # the reader's finally aborts the sequence with "cancel"
    wait_for(lambda: all(g.pool.n_used == 0 for g in kv.groups), timeout=2)
    assert all(kv.length(s) == 0 for s in range(len(kv.seqs)))
    assert b.scheduler.running == 0


# -- prefix sharing ------------------------------------------------------------------------------

PREFIX = PD_TEXT[:420]  # ~90 Gemma tokens


@pytest.mark.parametrize("kv", ["fp32", "fp8"])
def test_prefix_sharing_reuses_blocks_with_identical_outputs(make: Callable[..., NativeBatchedBackend], gemma_model: Any,
                                                             gemma_tokenizer: Any, kv: str) -> None:
    b = make(parallel=2, n_ctx=512, kv=kv)
    p1, p2 = PREFIX + " Who said this?", PREFIX + " When was this written?"
    shared = len(b.tokenize(PREFIX))
    assert shared >= 64
    # one after the other: the second starts from the first's cached KV
    first = Run(b, p1, max_tokens=6).join()
    second = Run(b, p2, max_tokens=6).join()
    assert second.outcome.cached_tokens >= shared - 1 > 0
    assert first.outcome.cached_tokens == 0
    same_events(first, alone(gemma_model, gemma_tokenizer, p1, kv=kv, max_tokens=6))
    same_events(second, alone(gemma_model, gemma_tokenizer, p2, kv=kv, max_tokens=6))


def test_prefix_blocks_are_shared_while_both_run(make: Callable[..., NativeBatchedBackend], gemma_model: Any,
                                                 gemma_tokenizer: Any) -> None:
    """A request arriving while another with the same long prefix runs shares its blocks (a fork:
    reference count 2, copy on write at the first differing block): the pool holds fewer blocks
    than two separate copies, and both outputs are the alone ones."""
    b = make(parallel=2, n_ctx=512, kv="fp32")
    kv = b.batch.kv
    p1, p2 = PREFIX + " Who said this?", PREFIX + " When was this written?"
    seen: list[tuple[int, int, int, int]] = []  # per step, full-attention group: used, shared, table entries, live seqs
    step = b.batch.step

    def spy(*a: Any, **k: Any) -> Any:
        out = step(*a, **k)
        g = kv.groups[0]
        entries = sum(x >= 0 for s in kv.seqs for x in s.tables[0])
        seen.append((g.pool.n_used, int((g.pool.ref > 1).sum()), entries, sum(kv.length(s) > 0 for s in range(len(kv.seqs)))))
        return out

    b.batch.step = spy  # type: ignore[method-assign]
    first = Run(b, p1, max_tokens=40)
    wait_for(lambda: len(first.events) >= 2)
    second = Run(b, p2, max_tokens=6).join()
    first.join()
    assert second.outcome.cached_tokens >= len(b.tokenize(PREFIX)) - 1
    both = [s for s in seen if s[3] == 2]
    assert both, "the two sequences never ran in the same step"
    whole = (len(b.tokenize(PREFIX)) - 1) // BLOCK  # whole blocks of the shared prefix
    for used, shared, entries, _ in both:
        assert shared >= whole  # the prefix's blocks are listed by both tables (reference count 2)
        assert used == entries - shared < entries  # fewer blocks than two separate copies
    same_events(first, alone(gemma_model, gemma_tokenizer, p1, kv="fp32", max_tokens=40))
    same_events(second, alone(gemma_model, gemma_tokenizer, p2, kv="fp32", max_tokens=6))
    assert_pools_consistent(b)


def test_cancelling_the_prefix_source_keeps_the_sharers_blocks(make: Callable[..., NativeBatchedBackend], gemma_model: Any,
                                                                gemma_tokenizer: Any) -> None:
    """The sequence whose blocks a later request forked is cancelled mid-way: only its own
    references go; the sharer finishes with its alone output and nothing leaks."""
    b = make(parallel=2, n_ctx=512, kv="fp32")
    kv = b.batch.kv
    p1, p2 = PREFIX + " Who said this?", PREFIX + " When was this written?"
    first = Run(b, p1, max_tokens=200)
    wait_for(lambda: len(first.events) >= 2)
    second = Run(b, p2, max_tokens=12)
    wait_for(lambda: len(second.events) >= 2)
    assert second.outcome.cached_tokens >= len(b.tokenize(PREFIX)) - 1
    first.cancel.set()
    first.join()
    second.join()
    wait_for(lambda: b.scheduler.running == 0)
    same_events(second, alone(gemma_model, gemma_tokenizer, p2, kv="fp32", max_tokens=12))
    held = [s for s in range(len(kv.seqs)) if kv.length(s) > 0]
    assert len(held) == 1 and kv.length(held[0]) == len(b.tokenize(p2)) + 11  # the finished sharer, cached
    assert int(kv.groups[0].pool.ref.max()) == 1
    assert_pools_consistent(b)


# -- preemption ----------------------------------------------------------------------------------


def test_preemption_and_recompute_give_alone_outputs(make: Callable[..., NativeBatchedBackend], gemma_model: Any,
                                                     gemma_tokenizer: Any) -> None:
    """n_ctx fits the first budgets (prompt + 32 cells) of two requests, not their growth: the
    youngest running sequence is preempted, recomputed later from its prompt + generated tokens,
    and every output is still the alone greedy one."""
    max_tokens = 48
    prompts = PROMPTS
    lens = [len(gemma_tokenizer.tokenize(p)) for p in prompts]
    b = make(parallel=4, n_ctx=max(64, lens[0] + lens[1] + 64 + 8))
    assert lens[0] + lens[1] + 2 * max_tokens > b.decoder.n_cells
    runs = together(b, prompts, max_tokens=max_tokens)
    assert b.scheduler.preemptions > 0
    refs = [alone(gemma_model, gemma_tokenizer, p, max_tokens=max_tokens) for p in prompts]
    for r, ref in zip(runs, refs):
        assert len(r.tokens) == max_tokens
        same_events(r, ref)
    assert_pools_consistent(b)


# -- sliding-window rings ------------------------------------------------------------------------


def test_sliding_window_blocks_stay_bounded(make: Callable[..., NativeBatchedBackend], gemma_model: Any,
                                            gemma_tokenizer: Any) -> None:
    """A prompt well past Gemma's 512-token window, prefilled in 64-token chunks, then decode: the
    sliding-window group holds at most ceil((window + chunk) / block) + 2 blocks of that sequence
    at any step (its ring), while the full-attention group holds every position; the output is
    the single Runner's, whose sliding-window layers use a ring."""
    window = gemma_model.config.sliding_window
    assert window == 512
    chunk, n_ctx, max_tokens = 64, 1024, 8
    prompt = gemma_tokenizer.tokenize(PD_TEXT + PD_TEXT)[:900]
    b = make(parallel=2, n_ctx=n_ctx, prefill_chunk=chunk)
    kv = b.batch.kv
    swa = next(i for i, g in enumerate(kv.groups) if g.window == window)
    full = next(i for i, g in enumerate(kv.groups) if g.window == 0)
    peaks: list[tuple[int, int, int]] = []  # per sequence and step, before end(): (positions, swa blocks, full blocks)
    end = kv.end

    def spy() -> None:
        for sg in kv._batch:
            s = kv.seqs[sg.seq]
            peaks.append((sg.pos + sg.count, sum(x >= 0 for x in s.tables[swa]), sum(x >= 0 for x in s.tables[full])))
        end()

    kv.end = spy  # type: ignore[method-assign]
    other = Run(b, PROMPTS[0], max_tokens=max_tokens)  # a short neighbour in the same steps
    run = Run(b, prompt, max_tokens=max_tokens).join()
    other.join()
    bound = math.ceil((window + chunk) / BLOCK) + 2
    assert max(p[0] for p in peaks) == len(prompt) + max_tokens - 1
    assert max(p[1] for p in peaks) <= bound < -(-len(prompt) // BLOCK), (max(p[1] for p in peaks), bound)
    assert max(p[2] for p in peaks) == -(-(len(prompt) + max_tokens - 1) // BLOCK)  # the full group grows
    slot = next(s for s in range(len(kv.seqs)) if kv.length(s) > window)
    assert sum(x < 0 for x in kv.seqs[slot].tables[swa]) >= (len(prompt) - window - chunk) // BLOCK  # released
    assert not kv.reusable(slot, 100) and kv.reusable(slot, kv.length(slot))

    ref_b = NativeBackend("alone", Runner(gemma_model, n_ctx=n_ctx, kv_cache="fp8", prefill_chunk=chunk, ops="kernels"),
                          gemma_tokenizer, "gemma")
    assert any(lay.ring for lay in ref_b.runner.kv.layers)  # the single runner keeps a ring for these layers
    ref = Run(ref_b, prompt, max_tokens=max_tokens).join()
    same_events(run, ref)
    same_events(other, alone(gemma_model, gemma_tokenizer, PROMPTS[0], max_tokens=max_tokens))
    assert_pools_consistent(b)


# -- logprobs and stop strings -------------------------------------------------------------------


def test_logprobs_and_stop_strings_match_alone(make: Callable[..., NativeBatchedBackend], gemma_model: Any,
                                               gemma_tokenizer: Any) -> None:
    b = make(parallel=4)
    free = alone(gemma_model, gemma_tokenizer, PROMPTS[3], max_tokens=10)
    assert "yellow" in free.text, free.text
    per: list[dict[str, Any]] = [{"logprobs": 3}, {"stop": ("yellow",)}, {"logprobs": 2, "stop": ("\n",)}, {"logprobs": 0}]
    prompts = [PROMPTS[0], PROMPTS[3], PROMPTS[1], PROMPTS[2]]
    runs = together(b, prompts, per, max_tokens=10)
    refs = [alone(gemma_model, gemma_tokenizer, p, max_tokens=10, **kw) for p, kw in zip(prompts, per)]
    for r, ref, kw in zip(runs, refs, per):
        same_events(r, ref)
        if kw.get("logprobs") is not None:
            got = [(e.logprob, e.top_logprobs) for e in r.events if e.token_id >= 0]
            want = [(e.logprob, e.top_logprobs) for e in ref.events if e.token_id >= 0]
            assert got == want
            assert all(lp is not None and top is not None and len(top) <= max(1, kw["logprobs"]) for lp, top in got)
    assert runs[1].outcome.finish_reason == "stop" and runs[1].text == free.text[: free.text.index("yellow")]
    assert runs[1].outcome.completion_tokens == len(runs[1].tokens)
    # chat prompts with the template's stop strings (special tokens in the prompt)
    chats = [ChatPrompt(({"role": "user", "content": q},)) for q in ("Hi", "What is 2 + 2?")]
    runs = together(b, chats, max_tokens=16, logprobs=1)
    for r, c in zip(runs, chats):
        ref = alone(gemma_model, gemma_tokenizer, c, max_tokens=16, logprobs=1)
        same_events(r, ref)
        assert r.params.stop == ("<end_of_turn>",)
        assert [(e.logprob, e.top_logprobs) for e in r.events] == [(e.logprob, e.top_logprobs) for e in ref.events]
    wait_for(lambda: b.scheduler.running == 0)
    assert_pools_consistent(b)
    np.testing.assert_equal(b.kv_cache_bytes(), b.batch.kv.nbytes() + b.runner.kv.nbytes())


# -- request threads ------------------------------------------------------------------------------


def test_concurrent_readers_decode_their_own_tokens(make: Callable[..., NativeBatchedBackend], gemma_gguf: pathlib.Path) -> None:
    """Every batched stream turns its tokens into text on its own request thread (`_read`:
    StreamDecoder.add -> Tokenizer.piece) over the backend's ONE tokenizer: concurrent readers
    must each get their token's bytes (and nothing wrong may be cached for later streams)."""
    from capibara6.engine.tokenizer import Tokenizer

    ref = Tokenizer(gemma_gguf)
    try:
        truth = [ref.piece(t) for t in range(ref.n_vocab)]
    finally:
        ref.close()
    b = make(parallel=4)
    tok = b.tokenizer
    n = 4
    got: list[dict[int, bytes]] = [{} for _ in range(n)]
    start = threading.Barrier(n)

    def reader(i: int) -> None:
        start.wait()
        for t in range(i, tok.n_vocab, n):
            got[i][t] = tok.piece(t)

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wrong = [(t, truth[t], p) for g in got for t, p in g.items() if p != truth[t]]
    assert not wrong, f"{len(wrong)} tokens decoded to another token's bytes, e.g. {wrong[:3]}"
    cached = [t for t in range(tok.n_vocab) if tok.piece(t) != truth[t]]
    assert not cached, f"{len(cached)} wrong pieces stay cached, e.g. {cached[:5]}"
