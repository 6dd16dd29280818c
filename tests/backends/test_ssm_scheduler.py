"""The scheduler in `recurrent` mode against a scripted recurrent memory (the `Decoder` seam).

The scripted memory behaves as llama.cpp's llama_memory_recurrent does for one state per
sequence id: removing from position 0 clears it, removing from past its end is a no-op, anything
in between is impossible (the test fails), and no state can be copied. Tokens are a hash of the
whole history, so a state reused when it should not be changes the output.
"""

from __future__ import annotations

from typing import Any

import pytest

from capibara6.backends.llamacpp.scheduler import Scheduler, SeqState
from capibara6.types import SamplingParams

from .test_scheduler_logic import ScriptedDecoder, collect, make, reference


class RecurrentDecoder(ScriptedDecoder):
    def seq_rm(self, seq_id: int, p0: int, p1: int) -> None:
        cells = self.kv.setdefault(seq_id, [])
        assert p1 == -1
        assert p0 == 0 or p0 >= len(cells), f"seq {seq_id}: a recurrent state cannot be cut at {p0} of {len(cells)}"
        if p0 == 0:
            cells.clear()

    def seq_cp(self, src: int, dst: int, p0: int, p1: int) -> None:
        raise AssertionError("a recurrent state cannot be copied as a prefix")


@pytest.fixture
def rsched() -> Any:
    made: list[Scheduler] = []

    def build(n_cells: int, slots: int, chunk: int) -> tuple[Scheduler, RecurrentDecoder]:
        d = RecurrentDecoder(n_cells)
        s = Scheduler(d, slots, chunk, recurrent=True)
        made.append(s)
        return s, d

    yield build
    for s in made:
        s.close()


def history(d: ScriptedDecoder, slot: int) -> list[int]:
    return [tok for _, tok in d.kv[slot]]


def test_a_continued_conversation_reuses_the_whole_state_in_place(rsched: Any) -> None:
    s, d = rsched(n_cells=2000, slots=2, chunk=16)
    a = make(30, 6, 100)
    s.submit(a)
    out, _ = collect(a)
    assert out == reference(a.prompt, 6)
    fed = history(d, a.slot)  # the prompt and every generated token but the last
    assert fed == [*a.prompt, *out[:-1]]
    b = SeqState([*fed, out[-1], 7, 8, 9], SamplingParams(max_tokens=5))
    s.submit(b)
    assert collect(b)[0] == reference(b.prompt, 5)
    assert b.reused == len(fed) and b.slot == a.slot


def test_a_partial_match_recomputes_instead_of_cutting_the_state(rsched: Any) -> None:
    s, d = rsched(n_cells=2000, slots=2, chunk=16)
    shared = [1, *range(500, 540)]
    a = SeqState([*shared, 7, 8], SamplingParams(max_tokens=5))
    s.submit(a)
    collect(a)
    b = SeqState([*shared, 9], SamplingParams(max_tokens=5))  # KV would trim a's cells; a state cannot
    s.submit(b)
    assert collect(b)[0] == reference(b.prompt, 5)
    assert b.reused == 0


def test_a_running_sequence_shares_nothing(rsched: Any) -> None:
    s, d = rsched(n_cells=2000, slots=2, chunk=16)
    shared = [1, *range(500, 540)]
    long = SeqState([*shared, *range(600, 620)], SamplingParams(max_tokens=500))
    s.submit(long)
    first = [long.events.get(timeout=5)[1] for _ in range(3)]
    other = SeqState([*shared, *range(800, 810)], SamplingParams(max_tokens=3))
    s.submit(other)
    assert collect(other)[0] == reference(other.prompt, 3)
    assert other.reused == 0 and d.copies == 0
    s.abort(long, "cancel")
    assert first == reference(long.prompt, 3)


def test_preemption_drops_whole_states_and_recomputes_exactly(rsched: Any) -> None:
    """A hybrid's attention layers share KV cells: preemption still works, by whole states."""
    s, d = rsched(n_cells=160, slots=4, chunk=8)
    seqs = [make(n, m, 50 * i) for i, (n, m) in enumerate(((20, 60), (30, 50), (12, 70), (25, 40), (18, 55)))]
    originals = [list(q.prompt) for q in seqs]
    for q in seqs:
        s.submit(q)
    for q, prompt in zip(seqs, originals):
        tokens, reason = collect(q)
        assert reason == "length" and tokens == reference(prompt, q.params.max_tokens)
    assert s.preemptions >= 1
