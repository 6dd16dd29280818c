"""Scheduling logic against a scripted decoder (the `Decoder` seam): fast and exact.

The scripted "model" makes each next token a hash of the sequence's whole KV history, so any
bookkeeping error (a wrong position, a lost prompt chunk, a bad prefix copy, a preempted sequence
resumed with the wrong history) changes the output. It also checks what llama.cpp would reject:
positions must continue each sequence, and physical KV cells never exceed the cache.
"""

from __future__ import annotations

import itertools
import queue
import threading
from typing import Any
from typing import Sequence as Seq

import pytest

from capibara6.backends.llamacpp.scheduler import Scheduler, SeqState
from capibara6.types import SamplingParams


def next_token(history: Seq[int]) -> int:
    return hash(tuple(history)) % 1000 + 10


def reference(prompt: list[int], max_tokens: int) -> list[int]:
    tokens, out = list(prompt), []
    for _ in range(max_tokens):
        out.append(next_token(tokens))
        tokens.append(out[-1])
    return out


class ScriptedDecoder:
    def __init__(self, n_cells: int) -> None:
        self.n_cells = n_cells
        self.pause_at: int | None = None  # decode number at which the scheduler thread waits ...
        self.paused = threading.Event()
        self.resume = threading.Event()  # ... until the test lets it go on
        self.kv: dict[int, list[tuple[int, int]]] = {}  # seq id -> [(cell id, token)] by position
        self._ids = itertools.count()
        self._out: list[int] = []
        self.batches: list[list[tuple[int, int, int, bool]]] = []
        self.copies = 0

    def used(self) -> int:
        return len({cell for cells in self.kv.values() for cell, _ in cells})

    def decode(self, tokens: Seq[int], pos: Seq[int], seq_ids: Seq[int], logits: Seq[bool]) -> None:
        self.batches.append(list(zip(tokens, pos, seq_ids, logits)))
        if len(self.batches) == self.pause_at:
            self.paused.set()
            assert self.resume.wait(10)
        self._out = []
        for t, p, s, want in zip(tokens, pos, seq_ids, logits):
            cells = self.kv.setdefault(s, [])
            assert p == len(cells), f"seq {s}: position {p} after {len(cells)} cells"
            cells.append((next(self._ids), t))
            if want:
                self._out.append(next_token([tok for _, tok in cells]))
        assert self.used() <= self.n_cells, "KV cache overflow"

    def sample(self, sampler: Any, index: int) -> int:
        return self._out[index]

    def logprobs(self, index: int, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
        return 0.0, []

    def is_eog(self, token: int) -> bool:
        return False

    def seq_rm(self, seq_id: int, p0: int, p1: int) -> None:
        cells = self.kv.setdefault(seq_id, [])
        assert p1 == -1
        del cells[p0:]

    def seq_cp(self, src: int, dst: int, p0: int, p1: int) -> None:
        assert p0 == 0 and not self.kv.get(dst)
        self.kv[dst] = list(self.kv[src][:p1])
        self.copies += 1

    def free_sampler(self, sampler: Any) -> None:
        pass


def collect(seq: SeqState, timeout: float = 10) -> tuple[list[int], str]:
    out = []
    while True:
        item = seq.events.get(timeout=timeout)
        if item[0] == "end":
            return out, item[1]
        assert item[0] == "token", item
        out.append(item[1])


def make(prompt_len: int, max_tokens: int, base: int) -> SeqState:
    return SeqState([1, *range(base, base + prompt_len - 1)], SamplingParams(max_tokens=max_tokens))


@pytest.fixture
def sched() -> Any:
    made: list[Scheduler] = []

    def build(n_cells: int, slots: int, chunk: int) -> tuple[Scheduler, ScriptedDecoder]:
        d = ScriptedDecoder(n_cells)
        s = Scheduler(d, slots, chunk)
        made.append(s)
        return s, d

    yield build
    for s in made:
        s.close()


def test_batches_put_decodes_first_and_cap_prefill(sched: Any) -> None:
    s, d = sched(n_cells=1000, slots=3, chunk=16)
    seqs = [make(n, 12, 100 * i) for i, n in enumerate((5, 40, 70, 9, 33))]
    with s.hold():
        for q in seqs:
            s.submit(q)
    for q in seqs:
        tokens, reason = collect(q)
        assert tokens == reference(q.prompt, 12) and reason == "length"
    assert s.peak_running == 3
    assert len(s.stats) == len(d.batches)
    for stat, batch in zip(s.stats, d.batches):
        assert stat.n_prefill <= 16 and len(batch) == stat.n_decode + stat.n_prefill
        head = batch[: stat.n_decode]  # one decode token per running sequence, first
        assert all(want for *_, want in head) and len({sid for _, _, sid, _ in head}) == stat.n_decode
    assert any(st.n_decode and st.n_prefill for st in s.stats)  # prefill rode along with decodes


def test_preemption_keeps_every_history_exact(sched: Any) -> None:
    s, d = sched(n_cells=160, slots=4, chunk=8)
    seqs = [make(n, m, 50 * i) for i, (n, m) in enumerate(((20, 60), (30, 50), (12, 70), (25, 40), (18, 55)))]
    originals = [list(q.prompt) for q in seqs]
    for q in seqs:
        s.submit(q)
    for q, prompt in zip(seqs, originals):
        tokens, reason = collect(q)
        assert reason == "length" and tokens == reference(prompt, q.params.max_tokens)
    assert s.preemptions >= 1


def test_preempting_a_prefilling_sequence_keeps_its_prompt(sched: Any) -> None:
    s, d = sched(n_cells=100, slots=2, chunk=4)
    d.pause_at = 36  # `a` has 46 of its 50 budgeted cells filled
    a = make(10, 80, 100)  # budget 50 (fair share): must grow 4 steps after the pause
    s.submit(a)
    assert d.paused.wait(10)
    b = make(40, 10, 300)  # budget 50; prefills 4 tokens a step: still prefilling when `a` must grow
    prompt_b = list(b.prompt)
    s.submit(b)
    d.resume.set()
    tokens, reason = collect(a)
    assert reason == "length" and tokens == reference(a.prompt, 80)
    assert collect(b) == (reference(prompt_b, 10), "length")
    assert s.preemptions >= 1


def test_prefix_reuse_copies_and_trims_exactly(sched: Any) -> None:
    s, d = sched(n_cells=1000, slots=3, chunk=32)
    shared = [1, *range(500, 540)]
    a = SeqState([*shared, 7, 8], SamplingParams(max_tokens=5))
    s.submit(a)
    assert collect(a)[0] == reference(a.prompt, 5)
    b = SeqState([*shared, 9], SamplingParams(max_tokens=5))
    s.submit(b)
    assert collect(b)[0] == reference(b.prompt, 5)
    assert b.reused == len(shared)  # trimmed a's cached sequence in place
    long = SeqState([*shared, *range(600, 700)], SamplingParams(max_tokens=800))
    other = SeqState([*shared, *range(800, 810)], SamplingParams(max_tokens=3))
    s.submit(long)
    first = [long.events.get(timeout=5)[1] for _ in range(3)]  # long is generating when `other` arrives
    s.submit(other)
    assert collect(other)[0] == reference(other.prompt, 3)
    assert other.reused == len(shared) and d.copies == 1 and other.slot != long.slot  # shared cells
    s.abort(long, "cancel")
    assert first == reference(long.prompt, 3)


def test_cancel_drops_kv_and_frees_the_slot(sched: Any) -> None:
    s, d = sched(n_cells=1000, slots=1, chunk=32)
    a = make(10, 10_000 // 20, 100)
    s.submit(a)
    a.events.get(timeout=5)
    b = make(10, 3, 300)
    s.submit(b)
    s.abort(a, "cancel")
    assert collect(b)[0] == reference(b.prompt, 3)
    assert [tok for _, tok in d.kv[0]][: len(b.prompt)] == b.prompt  # the slot now holds b, not a


def test_waiting_sequence_can_be_cancelled_and_oversized_is_refused(sched: Any) -> None:
    s, d = sched(n_cells=100, slots=1, chunk=32)
    a = make(10, 80, 100)
    s.submit(a)
    b = make(10, 5, 300)
    s.submit(b)  # waits: the only slot is busy
    s.abort(b, "cancel")
    tokens, reason = collect(a)
    assert reason == "length" and tokens == reference(a.prompt[:10], 80)
    with pytest.raises(queue.Empty):
        b.events.get(timeout=0.2)
    with pytest.raises(ValueError):
        s.submit(make(50, 60, 0))
