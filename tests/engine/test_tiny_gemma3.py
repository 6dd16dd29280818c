"""A tiny random-weight F32 `gemma3` GGUF: native logits == llama.cpp logits, past the window too."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

from capibara6.engine.runner import Runner

from .conftest import OPS_PARAMS, TINY_GEMMA3
from .llama_compat import LlamaCppGelu


def llama_cpp_logits(path: pathlib.Path, tokens: list[int]) -> np.ndarray:
    import llama_cpp
    from llama_cpp import Llama

    llm = Llama(
        model_path=str(path), logits_all=True, n_ctx=TINY_GEMMA3["n_ctx"], n_threads=1, n_batch=64, verbose=False,
        type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, flash_attn=False, swa_full=True,
    )
    try:
        llm.eval(tokens)
        return np.array(llm.scores[: len(tokens)], dtype=np.float32)
    finally:
        llm.close()


@pytest.mark.parametrize("ops", OPS_PARAMS)
def test_tiny_gemma3_matches_llama_cpp(tiny_gemma3_gguf: pathlib.Path, ops: str) -> None:
    rng = np.random.default_rng(2)
    tokens = [1] + [int(t) for t in rng.integers(3, 269, size=60)]  # 61 tokens >> window of 8
    ref = llama_cpp_logits(tiny_gemma3_gguf, tokens)
    r = Runner.load(tiny_gemma3_gguf, n_ctx=TINY_GEMMA3["n_ctx"], prefill_chunk=16, ops=ops)
    c = r.config
    assert c.arch == "gemma3" and c.sliding_window == 8 and c.head_dim_k == 32
    assert [il for il, swa in enumerate(c.swa_layers) if not swa] == [5]
    nat = np.concatenate([r.forward(tokens[:40], all_logits=True)] + [r.forward([t], all_logits=True) for t in tokens[40:]])
    diff = float(np.abs(nat - ref).max())
    print(f"tiny gemma3 ({ops}): max |native - llama.cpp| = {diff:.2e} (logit scale {np.abs(ref).max():.1f})")
    # llama.cpp's GELU is an fp16 lookup table (~1e-3 relative): with it emulated, within 1e-3.
    assert diff <= 1e-2
    r2 = Runner.load(tiny_gemma3_gguf, n_ctx=TINY_GEMMA3["n_ctx"], prefill_chunk=16, ops=LlamaCppGelu(r.ops))
    diff2 = float(np.abs(r2.forward(tokens, all_logits=True) - ref).max())
    print(f"  with llama.cpp's fp16 GELU table emulated: {diff2:.2e}")
    assert diff2 <= 1e-3
