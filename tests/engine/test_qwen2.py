"""Qwen2.5-Coder-0.5B-Instruct (qwen2, Q4_K/Q5_0/Q6_K/Q8_0 GGUF) on the native engine vs llama.cpp.

The engine's first real `qwen2` model. What qwen2 adds to the llama graph, all checked here on the
real file: q/k/v biases, an untied output matrix (Q8_0), rope theta 1e6 in NEOX mode, Q5_0
embeddings, a GPT-2 style BPE vocabulary (tokenized by llama.cpp's own vocab code, so both engines
see the same ids) and ChatML end-of-turn.

Unlike Gemma 3 270M, this model is well conditioned (measured over 300 tokens of PD_TEXT):
- native int16 vs llama.cpp on an F32 copy of the weights: top-1 1.0000, mean KL 5e-12;
- llama.cpp with itself, F16 vs F32 KV on the quantized file: top-1 0.970, mean KL 1.9e-3;
- native int16 vs llama.cpp on the quantized file (what the two backends serve): top-1 0.973,
  KL 1.5e-3, i.e. inside llama.cpp's own noise; native int8: top-1 0.967, KL 1.8e-3.
Bounds below leave a margin over those figures, never below llama.cpp's self-disagreement.
"""

from __future__ import annotations

import pathlib
import threading
from typing import Iterator

import numpy as np
import pytest

from capibara6.engine.gguf_file import GGUFFile
from capibara6.engine.gguf_loader import GGUFModel, load_gguf
from capibara6.engine.runner import Runner
from capibara6.engine.sampler import Sampler
from capibara6.engine.tokenizer import Tokenizer
from capibara6.engine.weights import QWeight

from .conftest import PD_TEXT, kl_rows, llama_cpp_scores, nll
from .test_gemma3 import GREEDY_PROMPTS, llama_cpp_greedy, report

QWEN_TOKENS = 300  # no sliding window to cross; [300, 151936] fp32 logits = 182 MB per run
IM_END = 151645  # <|im_end|>: the ChatML end of turn, the GGUF's eos
CHAT_PROMPT = (
    "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\nWrite a Python function `square(x)` that returns x squared. Only the code.<|im_end|>\n"
    "<|im_start|>assistant\n"
)


@pytest.fixture(scope="module")
def qwen_model(qwen_path: pathlib.Path) -> GGUFModel:
    return load_gguf(qwen_path)


@pytest.fixture(scope="module")
def qwen_tokenizer(qwen_path: pathlib.Path) -> Iterator[Tokenizer]:
    tok = Tokenizer(qwen_path)
    yield tok
    tok.close()


@pytest.fixture(scope="module")
def qwen_pd_tokens(qwen_tokenizer: Tokenizer) -> list[int]:
    return qwen_tokenizer.tokenize(PD_TEXT)[:QWEN_TOKENS]


@pytest.fixture(scope="module")
def qwen_f32_gguf(qwen_path: pathlib.Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[pathlib.Path]:
    """Every tensor dequantized to F32 (2.5 GB, ~23 s): llama.cpp then computes without 8-bit
    activations, i.e. the model these weights define."""
    from .llama_compat import write_f32_gguf

    path = write_f32_gguf(qwen_path, tmp_path_factory.mktemp("qwen-f32") / "qwen2.5-coder-0.5b-f32.gguf")
    yield path
    path.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def native_int16(qwen_model: GGUFModel, qwen_pd_tokens: list[int]) -> np.ndarray:
    r = Runner(qwen_model, n_ctx=len(qwen_pd_tokens) + 16, kv_cache="fp32", ops="kernels")
    return r.forward(qwen_pd_tokens, all_logits=True)


@pytest.fixture(scope="module")
def llama_cpp_quantized(qwen_path: pathlib.Path, qwen_pd_tokens: list[int]) -> np.ndarray:
    """llama.cpp as the llamacpp backend runs the file: its default F16 KV cache."""
    from llama_cpp import Llama

    n = len(qwen_pd_tokens)
    llm = Llama(model_path=str(qwen_path), logits_all=True, n_ctx=n + 16, n_threads=1, n_batch=512, verbose=False)
    try:
        llm.eval(qwen_pd_tokens)
        return np.array(llm.scores[:n], dtype=np.float32)
    finally:
        llm.close()


def test_the_file_exercises_what_qwen2_adds(qwen_path: pathlib.Path, qwen_model: GGUFModel, qwen_tokenizer: Tokenizer) -> None:
    c = qwen_model.config
    assert (c.arch, c.rope_mode, c.rope_base, c.sliding_window) == ("qwen2", "neox", 1_000_000.0, 0)
    assert (c.n_head, c.n_head_kv, c.head_dim_k) == (14, 2, 64)  # GQA 7:1
    assert all(f"blk.{il}.attn_{x}.bias" in qwen_model.tensors for il in range(c.n_layer) for x in "qkv")
    assert qwen_model.file_types["output.weight"] == "Q8_0"  # untied: not the Q5_0 embedding
    assert qwen_model.file_types["token_embd.weight"] == "Q5_0"
    matrices = {n: w for n, w in qwen_model.tensors.items() if isinstance(w, QWeight)}
    assert {qwen_model.file_types[n] for n in matrices} == {"Q4_K", "Q5_0", "Q6_K", "Q8_0"}
    assert qwen_model.owned_bytes < 2_000_000  # only norms and biases dequantized; matrices stay mapped
    assert GGUFFile(qwen_path).metadata["tokenizer.ggml.model"] == "gpt2"
    assert not qwen_tokenizer.add_bos and IM_END in qwen_tokenizer.eog_ids
    ids = qwen_tokenizer.tokenize("def fibonacci(n):\n    return n")
    assert qwen_tokenizer.detokenize(ids) == "def fibonacci(n):\n    return n"  # byte-level BPE round trip


def test_teacher_forced_matches_llama_cpp_on_the_same_weights(
    native_int16: np.ndarray, qwen_f32_gguf: pathlib.Path, qwen_pd_tokens: list[int]
) -> None:
    ref = llama_cpp_scores(qwen_f32_gguf, qwen_pd_tokens)
    top1, kl = report(native_int16, ref, "qwen2 native int16 vs llama.cpp F32 weights")
    assert top1 >= 0.99
    assert kl <= 1e-6  # measured 5e-12
    targets = np.asarray(qwen_pd_tokens[1:])
    ppl_nat, ppl_ref = (float(np.exp(nll(x[:-1], targets).mean())) for x in (native_int16, ref))
    print(f"perplexity over {len(qwen_pd_tokens)} tokens: native {ppl_nat:.4f}, llama.cpp F32 {ppl_ref:.4f}")
    assert abs(ppl_nat / ppl_ref - 1) <= 1e-3


def test_quantized_file_agrees_within_llama_cpps_own_noise(
    qwen_path: pathlib.Path, qwen_model: GGUFModel, qwen_pd_tokens: list[int],
    native_int16: np.ndarray, llama_cpp_quantized: np.ndarray,
) -> None:
    """Against llama.cpp serving the same file: both native modes disagree with it no more than
    llama.cpp disagrees with itself when only its KV cache precision changes."""
    f32kv = llama_cpp_scores(qwen_path, qwen_pd_tokens)
    noise_top1 = float((llama_cpp_quantized.argmax(-1) == f32kv.argmax(-1)).mean())
    noise_kl = float(kl_rows(llama_cpp_quantized, f32kv).mean())
    print(f"\nllama.cpp F16 vs F32 KV on the Q file: top-1 {noise_top1:.4f}, mean KL {noise_kl:.2e}")
    r8 = Runner(qwen_model, n_ctx=len(qwen_pd_tokens) + 16, kv_cache="fp32", ops="kernels", matmul="int8")
    for label, nat in [("int16", native_int16), ("int8", r8.forward(qwen_pd_tokens, all_logits=True))]:
        top1, kl = report(nat, llama_cpp_quantized, f"qwen2 native {label} vs llama.cpp Q file (F16 KV)")
        assert top1 >= noise_top1 - 0.02
        assert kl <= 1.5 * noise_kl


def _native_greedy(r: Runner, ids: list[int], n: int) -> list[int]:
    r.reset()
    return [s.sample.token for s in r.generate(ids, Sampler(temperature=0.0), n)]


def test_greedy_continuations_match_llama_cpp(qwen_f32_gguf: pathlib.Path, qwen_model: GGUFModel, qwen_tokenizer: Tokenizer) -> None:
    import llama_cpp
    from llama_cpp import Llama

    llm = Llama(model_path=str(qwen_f32_gguf), n_ctx=128, n_threads=1, logits_all=True, verbose=False,
                type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, flash_attn=False)
    r = Runner(qwen_model, n_ctx=128, ops="kernels")
    same = 0
    try:
        for text in GREEDY_PROMPTS:
            ids = qwen_tokenizer.tokenize(text)
            ref = llama_cpp_greedy(llm, ids, 16)
            nat = _native_greedy(r, ids, 16)
            same += nat == ref
            print(f"\n{text!r}: native {qwen_tokenizer.detokenize(nat)!r} | llama.cpp {qwen_tokenizer.detokenize(ref)!r}")
    finally:
        llm.close()
    print(f"qwen2 greedy: {same}/5 identical for 16 tokens")
    assert same == 5


def test_chat_answer_matches_llama_cpp_and_ends_its_turn(qwen_path: pathlib.Path, qwen_model: GGUFModel, qwen_tokenizer: Tokenizer) -> None:
    """A ChatML turn, greedy until end of turn, against llama.cpp on the same quantized file (the
    llamacpp backend's arithmetic: 8-bit activations, F16 KV) with the engine in int8 mode (the
    same arithmetic): the instruct model writes the function and closes with <|im_end|>."""
    from llama_cpp import Llama

    ids = qwen_tokenizer.tokenize(CHAT_PROMPT)
    llm = Llama(model_path=str(qwen_path), n_ctx=256, n_threads=1, logits_all=True, verbose=False)
    try:
        ref = llama_cpp_greedy(llm, ids, 64)
    finally:
        llm.close()
    r = Runner(qwen_model, n_ctx=256, ops="kernels", matmul="int8")
    nat = _native_greedy(r, ids, 64)
    end = ref.index(IM_END) + 1 if IM_END in ref else len(ref)
    text = qwen_tokenizer.detokenize(nat[:end])
    print(f"\nnative: {text!r}\nllama.cpp: {qwen_tokenizer.detokenize(ref[:end])!r}")
    assert IM_END in ref and nat[:end] == ref[:end]
    assert "def square(x)" in text and "return" in text


def test_fp8_kv_keeps_perplexity(native_int16: np.ndarray, qwen_model: GGUFModel, qwen_pd_tokens: list[int]) -> None:
    n_ctx = len(qwen_pd_tokens) + 16
    r8 = Runner(qwen_model, n_ctx=n_ctx, kv_cache="fp8", ops="kernels")
    fp8 = r8.forward(qwen_pd_tokens, all_logits=True)
    targets = np.asarray(qwen_pd_tokens[1:])
    ppl32 = float(np.exp(nll(native_int16[:-1], targets).mean()))
    ppl8 = float(np.exp(nll(fp8[:-1], targets).mean()))
    top1, kl = report(fp8, native_int16, "qwen2 FP8 KV vs fp32 KV")
    print(f"perplexity fp32 KV {ppl32:.4f}, fp8 KV {ppl8:.4f} ({ppl8 / ppl32 - 1:+.2%})")
    # measured: top-1 0.970, KL 3.0e-3, perplexity -1.7% (E4M3's rounding moves it either way)
    assert top1 >= 0.94
    assert abs(ppl8 / ppl32 - 1) <= 0.03


def test_registry_native_twin_chats_through_the_gguf_template(qwen_path: pathlib.Path) -> None:
    """`qwen2.5-coder-0.5b-native` as models.yaml declares it (FP8 KV, int16): the chat is rendered
    by the GGUF's own template (no chat_format), which puts Qwen's default system prompt first, and
    the greedy answer is the function, ended by end of turn (finish_reason stop)."""
    from capibara6.backends.native import NativeBackend
    from capibara6.config import load_registry
    from capibara6.types import GenerationOutcome, SamplingParams
    from tests.fakes import prepared
    from tests.serverproc import ROOT

    spec = load_registry(ROOT / "models.yaml").models["qwen2.5-coder-0.5b-native"]
    assert (spec.backend, spec.kv_cache, spec.chat_format) == ("native", "fp8", None)
    spec = spec.model_copy(update={"n_ctx": 256})
    b = NativeBackend.load("qwen2.5-coder-0.5b-native", spec, qwen_path, n_threads=1)
    try:
        user = CHAT_PROMPT.split("<|im_start|>user\n")[1].split("<|im_end|>")[0]
        p = prepared(b, [{"role": "user", "content": user}])
        assert b.chat_format == "jinja" and p.text == CHAT_PROMPT
        out = GenerationOutcome()
        events = list(b.generate(p, SamplingParams(max_tokens=64, temperature=0.0), out, threading.Event()))
        text = "".join(e.text for e in events)
        print(f"\nnative twin: {text!r}")
        assert out.finish_reason == "stop" and "def square(x)" in text and "<|im_end|>" not in text
    finally:
        b.close()
