"""State-space and hybrid GGUFs (mamba2, rwkv7, falcon-h1) on the llama.cpp backends, for real.

The models are tiny random-weight F32 files (tests/backends/ssm_models.py). What must hold:
- the plain backend's greedy text for a prompt never depends on what ran before (its state is
  reused only for a strict continuation; see plain.py: a stale or half-cleared state would change
  the tokens);
- the batched backend gives each sequence the plain backend's tokens, whatever shares its batch
  (F32 weights: no quantized-activation drift, so equality is exact here), and reuses a finished
  slot's state for a continued conversation;
- the recurrent state bytes we count from the header are what llama.cpp serialises for a sequence.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from capibara6.backends.llamacpp.batched import LlamaCppBatchedBackend
from capibara6.backends.llamacpp.plain import LlamaCppBackend
from capibara6.config import parse_registry
from capibara6.gguf_header import read_header, recurrent_state_bytes, sequence_memory_bytes
from capibara6.types import GenerationOutcome, SamplingParams
from tests.fakes import prepared

from .ssm_models import WRITERS
from .test_scheduler import Run, together

ARCHS = ["mamba2", "rwkv7", "falcon-h1"]
PROMPTS = ["the cat sat on the mat", "a dog ran home", "the mat and the cat", "on a mat the dog sat"]


@pytest.fixture(scope="module", params=ARCHS)
def gguf(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    arch = str(request.param)
    return WRITERS[arch](tmp_path_factory.mktemp("ssm") / f"tiny-{arch}.gguf")


def spec(path: Path, **fields: Any) -> Any:
    entry = {"source": {"path": str(path)}, "chat_format": "chatml", "n_ctx": 512, "n_threads": 1, **fields}
    return parse_registry({"models": {"m": entry}}).models["m"]


def greedy(backend: Any, prompt: Any, max_tokens: int = 8) -> list[int]:
    out = GenerationOutcome()
    events = backend.generate(prepared(backend, prompt), SamplingParams(max_tokens=max_tokens, temperature=0.0), out, threading.Event())
    return [e.token_id for e in events if e.token_id >= 0]


@pytest.fixture(scope="module")
def plain(gguf: Path) -> Iterator[LlamaCppBackend]:
    b = LlamaCppBackend.load("m", spec(gguf), gguf, 1)
    yield b
    b.close()


@pytest.fixture(scope="module")
def fresh(gguf: Path) -> dict[str, list[int]]:
    """Each prompt's greedy tokens from a model that ran nothing else."""
    out = {}
    for p in PROMPTS:
        b = LlamaCppBackend.load("m", spec(gguf), gguf, 1)
        out[p] = greedy(b, p)
        b.close()
    return out


def test_plain_backend_is_recurrent_and_never_reuses_a_stale_state(plain: LlamaCppBackend, fresh: dict[str, list[int]]) -> None:
    assert plain.recurrent
    p, q = PROMPTS[0], PROMPTS[1]
    assert greedy(plain, p) == fresh[p]
    assert greedy(plain, q) == fresh[q]  # another prompt after p: the state was not p's
    assert greedy(plain, p, 1) == fresh[p][:1]
    # the same prompt after a one-token answer: llama-cpp-python's own prefix reuse would clear
    # the state at the last prompt position and decode that token alone
    assert greedy(plain, p) == fresh[p]


def test_plain_backend_continues_a_state_exactly(plain: LlamaCppBackend, gguf: Path) -> None:
    first = plain.tokenize(PROMPTS[2])
    answer = greedy(plain, first, 6)
    longer = [*first, *answer, *plain.tokenize(" the dog", add_bos=False)]
    continued = greedy(plain, longer)  # the state after `first` + answer is reused
    b = LlamaCppBackend.load("m", spec(gguf), gguf, 1)
    try:
        assert continued == greedy(b, longer)
    finally:
        b.close()


@pytest.fixture(scope="module")
def batched(gguf: Path) -> Iterator[LlamaCppBatchedBackend]:
    b = LlamaCppBatchedBackend.load("m", spec(gguf, parallel=3, prefill_chunk=16), gguf, 1)
    yield b
    b.close()


def test_batched_sequences_match_plain_without_cross_talk(batched: LlamaCppBatchedBackend, fresh: dict[str, list[int]]) -> None:
    assert batched.scheduler.recurrent
    runs = together(batched, PROMPTS[:3], max_tokens=8)
    assert [r.tokens for r in runs] == [fresh[p] for p in PROMPTS[:3]]
    # the same first sequence beside other content: its tokens do not move
    again = together(batched, [PROMPTS[0], PROMPTS[3], PROMPTS[1]], max_tokens=8)
    assert again[0].tokens == fresh[PROMPTS[0]] and again[1].tokens == fresh[PROMPTS[3]]


def test_batched_reuses_a_finished_state_only_for_a_continuation(batched: LlamaCppBatchedBackend, gguf: Path) -> None:
    first = batched.tokenize(PROMPTS[1])
    a = Run(batched, first, max_tokens=6).join()
    longer = [*first, *a.tokens, *batched.tokenize(" the mat", add_bos=False)]
    b = Run(batched, longer, max_tokens=8).join()
    assert b.outcome.cached_tokens == len(first) + len(a.tokens) - 1  # all but the last sampled token were fed
    shorter = Run(batched, first[:-1], max_tokens=4).join()  # a prefix of a cached history: recomputed
    assert shorter.outcome.cached_tokens == 0
    ref = LlamaCppBackend.load("m", spec(gguf), gguf, 1)
    try:
        assert b.tokens == greedy(ref, longer) and shorter.tokens == greedy(ref, first[:-1], 4)
    finally:
        ref.close()


def test_batched_cancel_frees_the_slot(gguf: Path, fresh: dict[str, list[int]]) -> None:
    """Cancelled after 3 of up to 4000 tokens (the reader sets it): the scheduler drops the
    sequence's state at its next step and the slot serves the next request correctly."""
    b = LlamaCppBatchedBackend.load("m", spec(gguf, n_ctx=4096, parallel=1), gguf, 1)
    try:
        cancel, out = threading.Event(), GenerationOutcome()
        events = b.generate(prepared(b, PROMPTS[2]), SamplingParams(max_tokens=4000, temperature=0.0), out, cancel)
        for i, _ in enumerate(events):
            if i == 2:
                cancel.set()
        assert out.completion_tokens == 3 and out.finish_reason is None
        deadline = time.monotonic() + 30
        while b.scheduler.running and time.monotonic() < deadline:
            time.sleep(0.01)
        assert b.scheduler.running == 0 and b.scheduler.stats[-1].n_decode <= 1
        assert sum(st.n_decode for st in b.scheduler.stats) < 4000
        assert greedy(b, PROMPTS[0]) == fresh[PROMPTS[0]]
    finally:
        b.close()


def test_state_bytes_are_what_llama_cpp_holds_per_sequence(batched: LlamaCppBatchedBackend, gguf: Path) -> None:
    """llama_state_seq_get_size serialises one sequence: its recurrent state per layer (+ a few
    header bytes) and, for a hybrid, the KV of the cells it uses."""
    import llama_cpp

    meta = read_header(gguf).metadata
    state = recurrent_state_bytes(meta)
    assert state > 0
    plain = LlamaCppBackend.load("m", spec(gguf), gguf, 1)
    try:
        tokens = plain.tokenize(PROMPTS[0])
        greedy(plain, tokens, 1)
        size = llama_cpp.llama_state_seq_get_size(plain.llm.ctx, 0)
        kv_used = sequence_memory_bytes(meta, len(tokens), None) - state  # KV of the fed cells (hybrid)
        assert 0 <= size - state - kv_used <= 4096, (size, state, kv_used)
    finally:
        plain.close()
    assert batched.kv_cache_bytes() == sequence_memory_bytes(meta, 512, None, 3)


def test_quantized_kv_cache_and_packed_embeddings(gguf: Path) -> None:
    """kv_cache q8_0 (the C4A registry's default) applies to a hybrid's attention layers and is
    ignored by a pure SSM (its state stays F32); embeddings of several inputs packed into one
    decode (one sequence, hence one state, each) equal each input embedded alone."""
    import numpy as np

    from capibara6.types import TextPrompt

    plain = LlamaCppBackend.load("m", spec(gguf, kv_cache="q8_0"), gguf, 1)
    batched = LlamaCppBatchedBackend.load("m", spec(gguf, kv_cache="q8_0", parallel=2), gguf, 1)
    try:
        assert greedy(batched, PROMPTS[0]) == greedy(plain, PROMPTS[0])
    finally:
        batched.close()
        plain.close()
    emb = LlamaCppBackend.load("m", spec(gguf, embedding={"pooling": "mean"}), gguf, 1)
    try:
        inputs = [emb.prepare(TextPrompt(p)) for p in PROMPTS]
        together_ = emb.embed(inputs, "mean", True)
        alone = [emb.embed([p], "mean", True)[0] for p in inputs]
        assert max(float(np.abs(a - b).max()) for a, b in zip(together_, alone)) < 1e-5
        assert float(np.abs(together_[0] - together_[1]).max()) > 1e-3  # different inputs, different vectors
    finally:
        emb.close()
