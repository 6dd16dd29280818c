"""Tiny random-weight GGUFs of state-space and hybrid architectures, for tests and benchmarks.

No small real SSM GGUF is on PyPI, so these are written here with the `gguf` package: F32
weights, the 269-token SPM vocabulary of tests/engine/conftest.py (`_tiny_vocab`), shapes as
llama.cpp's loaders ask for them (src/models/<arch>.cpp `load_arch_tensors`). The weights are
random, so the text is gibberish; what the tests check is that llama.cpp loads the file, that
greedy decoding is deterministic, and what the server does with a recurrent state.

Architectures (llama.cpp names):
- `mamba2`: attn_norm + ssm_in/conv1d/dt/A/D/norm/out per layer; recurrent state per sequence
  = conv (d_conv-1) x (d_inner + 2 n_group d_state) + ssm d_state x d_inner floats per layer.
- `rwkv7`: time mix (LoRA decay/iclr/value-residual/gate) + channel mix; state per sequence
  = token shift 2 x n_embd + wkv n_embd x head_size floats per layer.
- `falcon-h1` (hybrid): every layer has attention AND a Mamba-2 mixer in parallel, so it has a
  KV cache for n_ctx AND a recurrent state per sequence.
"""

from __future__ import annotations

import pathlib
from typing import Any, Callable

import numpy as np

from tests.engine.conftest import _tiny_vocab, write_tiny_llama

# mamba2: d_inner = n_head (time_step_rank) x head_dim = 8 x 16; one group
TINY_MAMBA2 = {"n_embd": 64, "n_layer": 2, "d_inner": 128, "d_state": 16, "d_conv": 4, "n_group": 1, "n_head": 8, "n_ctx": 8192}
# rwkv7: 2 heads of 64 (the size real RWKV-7 models use); LoRA ranks small
TINY_RWKV7 = {"n_embd": 128, "n_layer": 2, "head_size": 64, "n_ff": 128, "lora": 8, "n_ctx": 8192}
# falcon-h1: attention 4 heads (2 KV) of 32 (a q8_0 KV cache needs head sizes in blocks of 32)
# beside a Mamba-2 mixer of 8 heads of 16
TINY_FALCON_H1 = {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_head_kv": 2, "head_dim": 32, "n_ff": 128,
                  "d_inner": 128, "d_state": 16, "d_conv": 4, "n_group": 1, "ssm_heads": 8, "n_ctx": 8192}


class _Tensors:
    """Random F32 tensors in numpy order (the GGUF `ne` order reversed)."""

    def __init__(self, writer: Any, seed: int) -> None:
        self.w = writer
        self.rng = np.random.default_rng(seed)

    def mat(self, name: str, rows: int, cols: int, scale: float = 1.0) -> None:
        self.w.add_tensor(name, (scale * self.rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32))

    def vec(self, name: str, n: int, mean: float = 1.0, sd: float = 0.1, shape: tuple[int, ...] | None = None) -> None:
        arr = (mean + sd * self.rng.standard_normal(n)).astype(np.float32)
        self.w.add_tensor(name, arr.reshape(shape) if shape else arr)

    def arr(self, name: str, values: np.ndarray) -> None:
        self.w.add_tensor(name, values.astype(np.float32))


def _write(path: pathlib.Path, arch: str, seed: int, body: Callable[[Any, _Tensors, int], None]) -> pathlib.Path:
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    t = _Tensors(w, seed)
    w.add_file_type(0)  # ALL_F32
    n_vocab = _tiny_vocab(w, t.rng)
    body(w, t, n_vocab)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _mamba2_mixer(t: _Tensors, p: str, d: int, d_inner: int, d_state: int, d_conv: int, n_group: int, n_head: int) -> None:
    """One Mamba-2 mixer's tensors under prefix `p` (mamba2 and falcon-h1 share them)."""
    conv_dim = d_inner + 2 * n_group * d_state
    t.mat(p + "ssm_in.weight", d_inner + conv_dim + n_head, d)
    t.mat(p + "ssm_conv1d.weight", conv_dim, d_conv)
    t.vec(p + "ssm_conv1d.bias", conv_dim, 0.0, 0.1)
    t.vec(p + "ssm_dt.bias", n_head, -2.0, 0.5)  # softplus(-2) ~ 0.13: a slow decay, a stable state
    t.arr(p + "ssm_a", -t.rng.uniform(1.0, 8.0, (n_head, 1)))  # A = -exp(A_log) < 0
    t.vec(p + "ssm_d", n_head, 1.0, 0.1, (n_head, 1))
    t.vec(p + "ssm_norm.weight", d_inner, 1.0, 0.1, (n_group, d_inner // n_group))
    t.mat(p + "ssm_out.weight", d, d_inner)


def write_tiny_mamba2(path: pathlib.Path, seed: int = 0, dims: dict[str, int] | None = None) -> pathlib.Path:
    c = {**TINY_MAMBA2, **(dims or {})}

    def body(w: Any, t: _Tensors, n_vocab: int) -> None:
        d = c["n_embd"]
        w.add_context_length(c["n_ctx"])
        w.add_embedding_length(d)
        w.add_block_count(c["n_layer"])
        w.add_feed_forward_length(0)
        w.add_head_count(0)
        w.add_ssm_conv_kernel(c["d_conv"])
        w.add_ssm_inner_size(c["d_inner"])
        w.add_ssm_state_size(c["d_state"])
        w.add_ssm_time_step_rank(c["n_head"])
        w.add_ssm_group_count(c["n_group"])
        w.add_layer_norm_rms_eps(1e-5)
        t.arr("token_embd.weight", t.rng.standard_normal((n_vocab, d)))
        t.vec("output_norm.weight", d)
        t.mat("output.weight", n_vocab, d)
        for il in range(c["n_layer"]):
            p = f"blk.{il}."
            t.vec(p + "attn_norm.weight", d)
            _mamba2_mixer(t, p, d, c["d_inner"], c["d_state"], c["d_conv"], c["n_group"], c["n_head"])

    return _write(path, "mamba2", seed, body)


def write_tiny_rwkv7(path: pathlib.Path, seed: int = 0, dims: dict[str, int] | None = None) -> pathlib.Path:
    c = {**TINY_RWKV7, **(dims or {})}

    def body(w: Any, t: _Tensors, n_vocab: int) -> None:
        d, r, ff = c["n_embd"], c["lora"], c["n_ff"]
        w.add_context_length(c["n_ctx"])
        w.add_embedding_length(d)
        w.add_block_count(c["n_layer"])
        w.add_feed_forward_length(ff)
        w.add_head_count(0)
        w.add_layer_norm_eps(1e-5)
        w.add_wkv_head_size(c["head_size"])
        w.add_decay_lora_rank(r)
        w.add_iclr_lora_rank(r)
        w.add_value_residual_mix_lora_rank(r)
        w.add_gate_lora_rank(r)
        w.add_token_shift_count(2)
        t.arr("token_embd.weight", t.rng.standard_normal((n_vocab, d)))
        t.vec("token_embd_norm.weight", d)
        t.vec("token_embd_norm.bias", d, 0.0)
        t.vec("output_norm.weight", d)
        t.vec("output_norm.bias", d, 0.0)
        t.mat("output.weight", n_vocab, d)
        for il in range(c["n_layer"]):
            p = f"blk.{il}."
            for norm in ("attn_norm", "attn_norm_2", "time_mix_ln"):
                t.vec(p + norm + ".weight", d)
                t.vec(p + norm + ".bias", d, 0.0)
            for x in ("w", "a", "v", "g"):
                if x != "g":
                    t.vec(p + f"time_mix_{x}0.weight", d, -0.5 if x == "w" else 0.0, 0.1)
                t.mat(p + f"time_mix_{x}1.weight", r, d, 0.1)
                t.mat(p + f"time_mix_{x}2.weight", d, r, 0.1)
            t.vec(p + "time_mix_lerp_fused.weight", 6 * d, 0.5, 0.1, (6, 1, 1, d))
            for x in ("k_k", "k_a", "r_k"):
                t.vec(p + f"time_mix_{x}.weight", d, 0.5, 0.1)
            for x in ("key", "value", "receptance", "output"):
                t.mat(p + f"time_mix_{x}.weight", d, d)
            t.vec(p + "channel_mix_lerp_k.weight", d, 0.5, 0.1, (1, 1, d))
            t.mat(p + "channel_mix_key.weight", ff, d)
            t.mat(p + "channel_mix_value.weight", d, ff)

    return _write(path, "rwkv7", seed, body)


def write_tiny_transformer(path: pathlib.Path, seed: int = 0, n_ctx: int = 8192) -> pathlib.Path:
    """The baseline of the same width: tests/engine's tiny llama (64 wide, 3 layers, GQA)."""
    return write_tiny_llama(path, seed, {"n_ctx": n_ctx})


WRITERS: dict[str, Callable[..., pathlib.Path]] = {"mamba2": write_tiny_mamba2, "rwkv7": write_tiny_rwkv7}


def write_tiny_falcon_h1(path: pathlib.Path, seed: int = 0, dims: dict[str, int] | None = None) -> pathlib.Path:
    """Falcon-H1: per layer, attention and a Mamba-2 mixer read the same norm and are summed."""
    c = {**TINY_FALCON_H1, **(dims or {})}

    def body(w: Any, t: _Tensors, n_vocab: int) -> None:
        d, h, hkv, hd, ff = c["n_embd"], c["n_head"], c["n_head_kv"], c["head_dim"], c["n_ff"]
        w.add_context_length(c["n_ctx"])
        w.add_embedding_length(d)
        w.add_block_count(c["n_layer"])
        w.add_feed_forward_length(ff)
        w.add_head_count(h)
        w.add_head_count_kv(hkv)
        w.add_key_length(hd)
        w.add_value_length(hd)
        w.add_rope_dimension_count(hd)
        w.add_rope_freq_base(10000.0)
        w.add_layer_norm_rms_eps(1e-5)
        w.add_ssm_conv_kernel(c["d_conv"])
        w.add_ssm_inner_size(c["d_inner"])
        w.add_ssm_state_size(c["d_state"])
        w.add_ssm_time_step_rank(c["ssm_heads"])
        w.add_ssm_group_count(c["n_group"])
        t.arr("token_embd.weight", t.rng.standard_normal((n_vocab, d)))
        t.vec("output_norm.weight", d)
        t.mat("output.weight", n_vocab, d)
        for il in range(c["n_layer"]):
            p = f"blk.{il}."
            t.vec(p + "attn_norm.weight", d)
            t.mat(p + "attn_q.weight", h * hd, d)
            t.mat(p + "attn_k.weight", hkv * hd, d)
            t.mat(p + "attn_v.weight", hkv * hd, d)
            t.mat(p + "attn_output.weight", d, h * hd)
            _mamba2_mixer(t, p, d, c["d_inner"], c["d_state"], c["d_conv"], c["n_group"], c["ssm_heads"])
            t.vec(p + "ffn_norm", d)  # llama.cpp's falcon-h1 loader asks for it without ".weight"
            t.mat(p + "ffn_gate.weight", ff, d)
            t.mat(p + "ffn_up.weight", ff, d)
            t.mat(p + "ffn_down.weight", d, ff)

    return _write(path, "falcon-h1", seed, body)


WRITERS["falcon-h1"] = write_tiny_falcon_h1
