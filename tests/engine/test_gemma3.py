"""Gemma 3 270M (Q4_K_M GGUF) on the native engine vs llama.cpp on the same file, and FP8 KV vs fp32 KV."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

from server.engine.gguf_loader import GGUFModel
from server.engine.runner import Runner
from server.engine.sampler import Sampler

from .conftest import kl_rows, nll

GREEDY_PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "def fibonacci(n):",
    "The three primary colors are",
    "Water boils at a temperature of",
]


@pytest.fixture(scope="module")
def native_fp32(gemma_model: GGUFModel, pd_tokens: list[int]) -> np.ndarray:
    r = Runner(gemma_model, n_ctx=len(pd_tokens) + 16, kv_cache="fp32", ops="kernels")
    return r.forward(pd_tokens, all_logits=True)


def test_text_is_longer_than_sliding_window(gemma_model: GGUFModel, pd_tokens: list[int]) -> None:
    c = gemma_model.config
    assert c.arch == "gemma3" and c.sliding_window > 0
    assert len(pd_tokens) > c.sliding_window + 64
    # llama.cpp's gemma3 pattern: every 6th layer (il % 6 == 5) is global.
    assert [il for il, swa in enumerate(c.swa_layers) if not swa] == [5, 11, 17]


def test_teacher_forced_matches_llama_cpp(native_fp32: np.ndarray, gemma_llama_cpp_scores: np.ndarray) -> None:
    ref = gemma_llama_cpp_scores
    n = ref.shape[0]
    top1 = native_fp32.argmax(-1) == ref.argmax(-1)
    kl = kl_rows(ref, native_fp32)
    print(f"\ngemma3 vs llama.cpp over {n} tokens: top-1 {top1.mean():.4f}, mean KL {kl.mean():.5f}, max KL {kl.max():.4f}")
    assert n >= 128
    assert top1[:128].mean() >= 0.98
    assert top1.mean() >= 0.98
    assert kl.mean() < 0.02


def test_beyond_sliding_window_matches_llama_cpp(
    native_fp32: np.ndarray, gemma_llama_cpp_scores: np.ndarray, gemma_model: GGUFModel
) -> None:
    w = gemma_model.config.sliding_window
    tail_nat, tail_ref = native_fp32[w:], gemma_llama_cpp_scores[w:]  # positions past the window
    top1 = (tail_nat.argmax(-1) == tail_ref.argmax(-1)).mean()
    kl = kl_rows(tail_ref, tail_nat).mean()
    print(f"\npositions {w}..{native_fp32.shape[0] - 1}: top-1 {top1:.4f}, mean KL {kl:.5f}")
    assert top1 >= 0.97
    assert kl < 0.02


def test_fp8_kv_close_to_fp32(native_fp32: np.ndarray, gemma_model: GGUFModel, pd_tokens: list[int]) -> None:
    n_ctx = len(pd_tokens) + 16
    r8 = Runner(gemma_model, n_ctx=n_ctx, kv_cache="fp8", ops="kernels")
    fp8 = r8.forward(pd_tokens, all_logits=True)
    r32 = Runner(gemma_model, n_ctx=n_ctx, kv_cache="fp32", ops="kernels")
    r32.kv.reserve(len(pd_tokens))
    top1 = (fp8.argmax(-1) == native_fp32.argmax(-1)).mean()
    targets = np.asarray(pd_tokens[1:])
    ppl32 = float(np.exp(nll(native_fp32[:-1], targets).mean()))
    ppl8 = float(np.exp(nll(fp8[:-1], targets).mean()))
    ratio = r8.kv.nbytes() / r32.kv.nbytes()
    print(f"\nFP8 KV: top-1 vs fp32 {top1:.4f}, ppl fp32 {ppl32:.4f} fp8 {ppl8:.4f} ({ppl8 / ppl32 - 1:+.3%}), "
          f"KV bytes {r8.kv.nbytes()} vs {r32.kv.nbytes()} = {ratio:.3f}x")
    assert top1 >= 0.99
    assert ppl8 <= ppl32 * 1.01
    assert ratio <= 0.27


def llama_cpp_greedy(llm, prompt: list[int], n: int) -> list[int]:  # type: ignore[no-untyped-def]
    llm.reset()
    llm.eval(prompt)
    out: list[int] = []
    for _ in range(n):
        t = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(t)
        llm.eval([t])
    return out


def test_greedy_continuations_match_llama_cpp(gemma_gguf: pathlib.Path, gemma_model: GGUFModel, gemma_tokenizer) -> None:  # type: ignore[no-untyped-def]
    from llama_cpp import Llama

    llm = Llama(model_path=str(gemma_gguf), n_ctx=128, n_threads=1, verbose=False)
    r = Runner(gemma_model, n_ctx=128, ops="kernels")
    same = 0
    try:
        for text in GREEDY_PROMPTS:
            ids = gemma_tokenizer.tokenize(text)
            ref = llama_cpp_greedy(llm, ids, 16)
            r.reset()
            nat = [s.sample.token for s in r.generate(ids, Sampler(temperature=0.0), 16)]
            same += nat == ref
            print(f"\n{text!r}: native {gemma_tokenizer.detokenize(nat)!r} | llama.cpp {gemma_tokenizer.detokenize(ref)!r}")
    finally:
        llm.close()
    print(f"greedy: {same}/5 identical for 16 tokens")
    assert same >= 4
