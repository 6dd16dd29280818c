"""A tiny random-weight F32 `llama` GGUF (GQA, q/k/v biases): native logits == llama.cpp logits."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

from capibara6.engine.runner import Runner

from .conftest import OPS_PARAMS, TINY


def llama_cpp_logits(path: pathlib.Path, tokens: list[int]) -> np.ndarray:
    import llama_cpp
    from llama_cpp import Llama

    llm = Llama(
        model_path=str(path), logits_all=True, n_ctx=TINY["n_ctx"], n_threads=1, n_batch=64, verbose=False,
        type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, flash_attn=False,
    )
    try:
        llm.eval(tokens)
        return np.array(llm.scores[: len(tokens)], dtype=np.float32)
    finally:
        llm.close()


@pytest.mark.parametrize("ops", OPS_PARAMS)
def test_tiny_llama_matches_llama_cpp(tiny_llama_gguf: pathlib.Path, ops: str) -> None:
    rng = np.random.default_rng(1)
    tokens = [1] + [int(t) for t in rng.integers(3, 269, size=150)]
    ref = llama_cpp_logits(tiny_llama_gguf, tokens)
    # Small prefill chunks so chunking, GEMM and the n_past offsets are all exercised.
    r = Runner.load(tiny_llama_gguf, n_ctx=TINY["n_ctx"], prefill_chunk=48, ops=ops)
    assert r.config.arch == "llama" and r.config.n_head_kv == 2
    nat = r.forward(tokens[:100], all_logits=True)
    nat = np.concatenate([nat] + [r.forward([t], all_logits=True) for t in tokens[100:]])  # decode path
    diff = float(np.abs(nat - ref).max())
    print(f"tiny llama ({ops}): max |native - llama.cpp| = {diff:.2e}")
    assert diff <= 1e-3


@pytest.mark.parametrize("kv", ["fp16", "fp8"])
def test_tiny_llama_quantized_kv_close(tiny_llama_gguf: pathlib.Path, kv: str) -> None:
    tokens = [1] + list(range(3, 120))
    base = Runner.load(tiny_llama_gguf, n_ctx=TINY["n_ctx"], ops="auto").forward(tokens, all_logits=True)
    r = Runner.load(tiny_llama_gguf, n_ctx=TINY["n_ctx"], kv_cache=kv, ops="auto")
    q = r.forward(tokens, all_logits=True)
    assert np.abs(q - base).max() < (0.02 if kv == "fp16" else 0.5)
    assert (q.argmax(-1) == base.argmax(-1)).mean() > 0.9
