"""A tiny llama GGUF with every block type the engine multiplies without dequantizing (Q4_0, Q5_0,
Q8_0, Q4_K, Q5_K, Q6_K): the native engine computes what llama.cpp computes."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from capibara6.engine.gguf_loader import load_gguf
from capibara6.engine.runner import Runner
from capibara6.engine.weights import QWeight

from .conftest import OPS_PARAMS, write_tiny_llama
from .test_tiny_llama import llama_cpp_logits

DIMS = {"n_embd": 256, "n_head": 4, "n_head_kv": 2, "n_layer": 2, "n_ff": 512, "n_ctx": 256}
QTYPES = {
    "token_embd": QT.Q8_0, "output": QT.Q8_0, "attn_q": QT.Q5_0, "attn_k": QT.Q4_0, "attn_v": QT.Q8_0,
    "attn_output": QT.Q4_K, "ffn_gate": QT.Q5_K, "ffn_up": QT.Q4_K, "ffn_down": QT.Q6_K,
}


@pytest.fixture(scope="module")
def tiny_quant(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return write_tiny_llama(tmp_path_factory.mktemp("tinyq") / "tiny-quant.gguf", seed=3, dims=DIMS, qtypes=QTYPES)


@pytest.fixture(scope="module")
def tokens() -> list[int]:
    rng = np.random.default_rng(5)
    return [1] + [int(t) for t in rng.integers(3, 269, size=90)]


@pytest.fixture(scope="module")
def reference(tiny_quant: pathlib.Path, tokens: list[int]) -> np.ndarray:
    return llama_cpp_logits(tiny_quant, tokens)


def test_matrices_stay_quantized_and_mapped(tiny_quant: pathlib.Path) -> None:
    m = load_gguf(tiny_quant)
    for name, qt in [("blk.0.attn_q.weight", QT.Q5_0), ("blk.1.ffn_down.weight", QT.Q6_K), ("token_embd.weight", QT.Q8_0)]:
        w = m[name]
        assert isinstance(w, QWeight) and w.qtype == qt
    assert m["blk.0.ffn_down.weight"].shape == (DIMS["n_embd"], DIMS["n_ff"])
    assert m.owned_bytes < 64 * 1024  # only the F32 vectors and biases are copies
    full = load_gguf(tiny_quant, weights="fp32")
    assert full.owned_bytes > 3 * m.mapped_bytes  # fp32 copies of every matrix


@pytest.mark.parametrize("ops", OPS_PARAMS)
def test_quantized_model_matches_llama_cpp(tiny_quant: pathlib.Path, tokens: list[int], reference: np.ndarray, ops: str) -> None:
    r = Runner.load(tiny_quant, n_ctx=DIMS["n_ctx"], prefill_chunk=32, ops=ops, matmul="int8")
    nat = r.forward(tokens[:70], all_logits=True)
    nat = np.concatenate([nat] + [r.forward([t], all_logits=True) for t in tokens[70:]])  # decode (GEMV)
    per_pos = np.abs(nat - reference).max(axis=-1)
    scale = float(np.abs(reference).max())
    print(f"\ntiny quantized llama ({ops}): |native - llama.cpp| median {np.median(per_pos):.2e}, "
          f"max {per_pos.max():.2e} (logits up to {scale:.1f})")
    # Most positions are bit-for-bit llama.cpp's. Where a float-order difference of one ulp moves
    # an activation across a Q8 rounding boundary, the next layers carry a small step.
    assert np.median(per_pos) <= 1e-5 * scale
    assert per_pos.max() <= 0.02 * scale
    assert (nat.argmax(-1) == reference.argmax(-1)).all()


def test_fp32_weights_are_measurably_further_from_llama_cpp(tiny_quant: pathlib.Path, tokens: list[int], reference: np.ndarray) -> None:
    """The match above is llama.cpp's arithmetic (Q8 activations), not mere closeness."""
    r = Runner.load(tiny_quant, n_ctx=DIMS["n_ctx"], ops="kernels", matmul="fp32")
    per_pos = np.abs(r.forward(tokens, all_logits=True) - reference).max(axis=-1)
    assert np.median(per_pos) > 1e-3 * float(np.abs(reference).max())


@pytest.mark.parametrize("ops", OPS_PARAMS)
def test_int16_activations_track_fp32_arithmetic(tiny_quant: pathlib.Path, tokens: list[int], ops: str) -> None:
    """The default (int16 activations, weights still read in their blocks) computes what the
    dequantized fp32 model computes, two orders of magnitude closer than llama.cpp's int8 does."""
    exact = Runner.load(tiny_quant, n_ctx=DIMS["n_ctx"], ops="numpy", matmul="fp32").forward(tokens, all_logits=True)
    scale = float(np.abs(exact).max())
    err = {}
    for mode in ("int16", "int8"):
        r = Runner.load(tiny_quant, n_ctx=DIMS["n_ctx"], prefill_chunk=40, ops=ops, matmul=mode)
        assert r.graph.act_bits == int(mode[3:])
        err[mode] = float(np.abs(r.forward(tokens, all_logits=True) - exact).max())
    print(f"\n{ops}: max |logits - fp32 model|: int16 {err['int16']:.2e}, int8 {err['int8']:.2e} (scale {scale:.1f})")
    assert err["int16"] <= 1e-3 * scale
    assert err["int16"] * 30 < err["int8"]


def test_fp32_mode_needs_dequantized_weights(tiny_quant: pathlib.Path) -> None:
    with pytest.raises(ValueError, match="weights='fp32'"):
        Runner(load_gguf(tiny_quant), n_ctx=64, matmul="fp32")
    with pytest.raises(ValueError, match="matmul must be one of"):
        Runner.load(tiny_quant, n_ctx=64, matmul="int4")
