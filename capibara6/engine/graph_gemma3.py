"""Gemma 3 forward pass, as llama.cpp computes it for `gemma3` GGUF files.

Differences from llama: embeddings scaled by sqrt(n_embd); per-head RMSNorm of q and k; RMSNorm
after attention and after the FFN as well as before; GeGLU (tanh GELU); NEOX rope; sliding-window
layers (il % 6 < 5) with rope base 10000 and global layers with the file's base; the query scale
folded into q before attention; output tied to the token embedding. The GGUF converter already
stored Gemma's (1 + w) norm weights, so norms use the weights as they are.
"""

from __future__ import annotations

import math

import numpy as np

from .graph_llama import LlamaGraph
from .kv_cache import KVCache
from .paged_kv import PagedKV


class Gemma3Graph(LlamaGraph):
    def embed(self, tokens: np.ndarray) -> np.ndarray:
        x = super().embed(tokens)
        x *= np.float32(math.sqrt(self.cfg.n_embd))
        return x

    def is_swa(self, il: int) -> bool:
        return bool(self.cfg.swa_layers) and self.cfg.swa_layers[il]

    def rope_params(self, il: int) -> tuple[float, float]:
        if self.is_swa(il):
            return self.cfg.rope_base_swa, 1.0
        return self.cfg.rope_base, self.cfg.rope_freq_scale

    def window(self, il: int) -> int:
        return self.cfg.sliding_window if self.is_swa(il) else 0

    def qkv(self, h: np.ndarray, il: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        q, k, v = super().qkv(h, il)
        c, t = self.cfg, h.shape[0]
        # Per-head norms over head_dim: rmsnorm works on rows, so view heads as rows.
        qn = self.ops.rmsnorm(q.reshape(t * c.n_head, c.head_dim_k), self.vec(il, "attn_q_norm.weight"), c.rms_eps)
        kn = self.ops.rmsnorm(k.reshape(t * c.n_head_kv, c.head_dim_k), self.vec(il, "attn_k_norm.weight"), c.rms_eps)
        return qn.reshape(q.shape), kn.reshape(k.shape), v

    def attn_block(self, x: np.ndarray, il: int, pos: np.ndarray, n_past: int, kv: KVCache | PagedKV) -> np.ndarray:
        o = super().attn_block(x, il, pos, n_past, kv)
        return self.norm(o, self.vec(il, "post_attention_norm.weight"))

    def ffn(self, h: np.ndarray, il: int) -> np.ndarray:
        g = self.linear(h, il, "ffn_gate")
        u = self.linear(h, il, "ffn_up")
        y = self.linear(self.ops.geglu(g, u), il, "ffn_down")
        return self.norm(y, self.vec(il, "post_ffw_norm.weight"))
