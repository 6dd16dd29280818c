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


def agreement_report(nat: np.ndarray, ref: np.ndarray, noise_kl: float, label: str) -> tuple[float, float, float]:
    """(top-1 agreement, agreement where llama.cpp's top-2 margin >= 1 logit, mean KL(llama.cpp || native))."""
    top1 = nat.argmax(-1) == ref.argmax(-1)
    s = np.partition(ref, -2, axis=-1)[:, -2:]
    clear = (s[:, 1] - s[:, 0]) >= 1.0
    kl = float(kl_rows(ref, nat).mean())
    print(f"\n{label}: {len(top1)} positions, top-1 {top1.mean():.4f}, top-1 where llama.cpp's margin >= 1 logit "
          f"{top1[clear].mean():.4f} ({clear.mean():.0%} of positions), mean KL {kl:.5f} "
          f"(llama.cpp F16-vs-F32 KV: {noise_kl:.5f})")
    return float(top1.mean()), float(top1[clear].mean()), kl


def test_teacher_forced_matches_llama_cpp(
    native_fp32: np.ndarray, gemma_llama_cpp_scores: np.ndarray, llama_cpp_noise_kl: float
) -> None:
    # This model is numerically touchy: llama.cpp disagrees with itself (F16 vs F32 KV cache) at
    # ~12% of positions, so "top-1 >= 98%" is only asked where llama.cpp's choice is clear.
    ref = gemma_llama_cpp_scores[:128]
    top1, top1_clear, kl = agreement_report(native_fp32[:128], ref, llama_cpp_noise_kl, "first 128 tokens")
    assert top1 >= 0.85 and top1_clear >= 0.98
    assert kl <= 1.5 * llama_cpp_noise_kl
    top1, top1_clear, kl = agreement_report(native_fp32, gemma_llama_cpp_scores, llama_cpp_noise_kl, "whole text")
    assert top1 >= 0.85 and top1_clear >= 0.98
    assert kl <= 1.5 * llama_cpp_noise_kl


def test_beyond_sliding_window_matches_llama_cpp(
    native_fp32: np.ndarray, gemma_llama_cpp_scores: np.ndarray, gemma_model: GGUFModel, llama_cpp_noise_kl: float
) -> None:
    w = gemma_model.config.sliding_window
    label = f"positions {w}..{native_fp32.shape[0] - 1} (past the {w}-token window)"
    top1, top1_clear, kl = agreement_report(native_fp32[w:], gemma_llama_cpp_scores[w:], llama_cpp_noise_kl, label)
    assert top1 >= 0.85 and top1_clear >= 0.98
    assert kl <= 1.5 * llama_cpp_noise_kl


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
    kl = float(kl_rows(native_fp32, fp8).mean())
    ratio = r8.kv.nbytes() / r32.kv.nbytes()
    print(f"\nFP8 KV vs fp32 KV: top-1 {top1:.4f}, mean KL {kl:.5f}, ppl fp32 {ppl32:.4f} fp8 {ppl8:.4f} "
          f"({ppl8 / ppl32 - 1:+.3%}), KV bytes {r8.kv.nbytes()} vs {r32.kv.nbytes()} = {ratio:.3f}x")
    # E4M3 keeps 3 mantissa bits; on this model that flips ~5% of near-tied top-1 choices.
    assert top1 >= 0.93
    assert ppl8 <= ppl32 * 1.01
    assert ratio <= 0.27


def llama_cpp_greedy(llm, prompt: list[int], n: int) -> tuple[list[int], list[np.ndarray]]:  # type: ignore[no-untyped-def]
    llm.reset()
    llm.eval(prompt)
    out: list[int] = []
    rows: list[np.ndarray] = []
    for _ in range(n):
        row = np.array(llm.scores[llm.n_tokens - 1])  # logits_all: every row is filled
        t = int(np.argmax(row))
        out.append(t)
        rows.append(row)
        llm.eval([t])
    return out, rows


def test_greedy_continuations_match_llama_cpp(gemma_gguf: pathlib.Path, gemma_model: GGUFModel, gemma_tokenizer) -> None:  # type: ignore[no-untyped-def]
    from llama_cpp import Llama

    llm = Llama(model_path=str(gemma_gguf), n_ctx=64, n_threads=1, logits_all=True, verbose=False)
    r = Runner(gemma_model, n_ctx=64, ops="kernels")
    same = 0
    try:
        for text in GREEDY_PROMPTS:
            ids = gemma_tokenizer.tokenize(text)
            ref, rows = llama_cpp_greedy(llm, ids, 16)
            r.reset()
            nat = [s.sample.token for s in r.generate(ids, Sampler(temperature=0.0), 16)]
            same += nat == ref
            print(f"\n{text!r}: native {gemma_tokenizer.detokenize(nat)!r} | llama.cpp {gemma_tokenizer.detokenize(ref)!r}")
            if nat != ref:
                # Where the two first part, llama.cpp itself must have been near a tie between them.
                i = next(j for j, (a, b) in enumerate(zip(nat, ref)) if a != b)
                margin = float(rows[i][ref[i]] - rows[i][nat[i]])
                print(f"  first divergence at token {i}: llama.cpp margin {margin:.3f} logits")
                assert margin < 1.0
    finally:
        llm.close()
    print(f"greedy: {same}/5 identical for 16 tokens")
    assert same >= 3
