"""Forward pass of `llama`-family models (Llama, Mistral, Qwen2): RMSNorm, RoPE, GQA, SwiGLU.

One call processes a chunk of T tokens at positions n_past..n_past+T-1: every projection is one
matmul with M=T (GEMM for prefill, GEMV for decode) and attention reads the KV cache, so memory
grows only with the cache. Layouts follow GGUF: weights [out, in], activations [T, features].
"""

from __future__ import annotations

from types import ModuleType

import numpy as np

from .errors import UnsupportedModel
from .gguf_loader import GGUFModel, ModelConfig
from .kv_cache import KVCache
from .paged_kv import PagedKV
from .weights import MATMUL_MODES, ROW_PATH_MAX, RowPlan, Weight, embed_rows, matmul, matmul_rows


class LlamaGraph:
    def __init__(self, model: GGUFModel, ops: ModuleType, matmul_mode: str = "int16") -> None:
        self.cfg: ModelConfig = model.config
        self.ops = ops
        self.act_bits = MATMUL_MODES[matmul_mode]
        self.m = model
        self.tok_embd = model["token_embd.weight"]
        out = model.get("output.weight")
        self.w_out = self.tok_embd if out is None else out  # tied embeddings when absent
        self._plans: dict[str, RowPlan] | None = None  # set during forward_batch only
        if model.get("rope_freqs.weight") is not None:
            raise UnsupportedModel("rope_freqs (Llama 3.1 rope scaling) is not supported yet")

    # -- pieces shared with subclasses -------------------------------------------------------

    def req(self, il: int, name: str) -> Weight:
        """A weight the architecture requires (KeyError names it when the file lacks it)."""
        return self.m[f"blk.{il}.{name}"]

    def vec(self, il: int, name: str) -> np.ndarray:
        """A required 1-D fp32 parameter of layer il (a norm weight)."""
        return self.m.vector(f"blk.{il}.{name}")

    def norm(self, x: np.ndarray, weight: np.ndarray) -> np.ndarray:
        return self.ops.rmsnorm(x, weight, self.cfg.rms_eps)

    def mm(self, x: np.ndarray, w: Weight) -> np.ndarray:
        if self._plans is None:
            return matmul(self.ops, x, w, self.act_bits)
        return matmul_rows(self.ops, x, w, self.act_bits, self._plans)

    def linear(self, x: np.ndarray, il: int, name: str) -> np.ndarray:
        y = self.mm(x, self.req(il, f"{name}.weight"))
        if f"blk.{il}.{name}.bias" in self.m.tensors:
            y += self.vec(il, f"{name}.bias")
        return y

    def embed(self, tokens: np.ndarray) -> np.ndarray:
        return embed_rows(self.ops, self.tok_embd, tokens)

    def rope_params(self, il: int) -> tuple[float, float]:
        return self.cfg.rope_base, self.cfg.rope_freq_scale

    def window(self, il: int) -> int:
        return 0

    def qkv(self, h: np.ndarray, il: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        c, t = self.cfg, h.shape[0]
        q = self.linear(h, il, "attn_q").reshape(t, c.n_head, c.head_dim_k)
        k = self.linear(h, il, "attn_k").reshape(t, c.n_head_kv, c.head_dim_k)
        v = self.linear(h, il, "attn_v").reshape(t, c.n_head_kv, c.head_dim_v)
        return q, k, v

    def attn_block(self, x: np.ndarray, il: int, pos: np.ndarray, n_past: int, kv: KVCache | PagedKV) -> np.ndarray:
        """Attention sub-block output (before the residual add) for x [T, n_embd]."""
        c, ops, t = self.cfg, self.ops, x.shape[0]
        h = self.norm(x, self.vec(il, "attn_norm.weight"))
        q, k, v = self.qkv(h, il)
        base, fscale = self.rope_params(il)
        ops.rope(q, pos, base, mode=c.rope_mode, rot_dim=c.rope_dim, freq_scale=fscale, out=q)
        ops.rope(k, pos, base, mode=c.rope_mode, rot_dim=c.rope_dim, freq_scale=fscale, out=k)
        a = kv.attend(il, q, k, v, n_past=n_past, scale=self.q_scale(), window=self.window(il))
        return self.linear(a.reshape(t, c.n_head * c.head_dim_v), il, "attn_output")

    def q_scale(self) -> float:
        return self.cfg.attn_scale

    def ffn(self, h: np.ndarray, il: int) -> np.ndarray:
        g = self.linear(h, il, "ffn_gate")
        u = self.linear(h, il, "ffn_up")
        return self.linear(self.ops.swiglu(g, u), il, "ffn_down")

    def layer(self, x: np.ndarray, il: int, pos: np.ndarray, n_past: int, kv: KVCache | PagedKV) -> np.ndarray:
        x = x + self.attn_block(x, il, pos, n_past, kv)
        h = self.norm(x, self.vec(il, "ffn_norm.weight"))
        return x + self.ffn(h, il)

    def final_norm(self, x: np.ndarray) -> np.ndarray:
        """The last hidden states after the output norm [T, n_embd]: what llama.cpp calls
        `result_norm` and pools for embeddings."""
        return self.norm(x, self.m.vector("output_norm.weight"))

    def head(self, x: np.ndarray) -> np.ndarray:
        h = self.final_norm(x)
        logits = self.mm(h, self.w_out)
        cap = self.cfg.final_logit_softcap
        if cap > 0:
            logits = np.tanh(logits / cap) * cap
        return logits

    # -- entry point ---------------------------------------------------------------------------

    def forward(self, tokens: np.ndarray, n_past: int, kv: KVCache, want: str = "last") -> np.ndarray | None:
        """Fill the KV cache for the chunk; logits [T, vocab] (want="all"), [1, vocab] ("last"),
        None ("none"), or the normed hidden states [T, n_embd] without the vocab projection ("hidden")."""
        t = tokens.shape[0]
        pos = np.arange(n_past, n_past + t, dtype=np.int32)
        x = self.embed(tokens)
        for il in range(self.cfg.n_layer):
            x = self.layer(x, il, pos, n_past, kv)
        if want == "none":
            return None
        if want == "hidden":
            return self.final_norm(x)
        if want == "last":
            x = x[-1:]  # the vocab projection is the biggest matmul: skip it for earlier rows
        return self.head(np.ascontiguousarray(x))

    def forward_batch(self, tokens: np.ndarray, pos: np.ndarray, kv: PagedKV, counts: list[int],
                      out_rows: np.ndarray) -> np.ndarray:
        """Several sequences in one pass: `tokens` [T] at positions `pos` [T] are the rows of the
        segments `kv.begin` was given (each sequence's rows contiguous, `counts` rows each, in
        order). Each weight is read once per call of `RowPlan` (once for a decode-only step),
        and every row takes the kernel path it takes alone (see RowPlan); attention reads each
        sequence's own blocks. Logits [len(out_rows), vocab] of the batch rows `out_rows` (the
        vocab projection takes the row path, as one row alone does)."""
        x = self.embed(tokens)
        self._plans = {kind: RowPlan.of(counts, limit) for kind, limit in ROW_PATH_MAX.items()}
        try:
            for il in range(self.cfg.n_layer):
                x = self.layer(x, il, pos, 0, kv)
            self._plans = {kind: RowPlan.of([1] * out_rows.size, limit) for kind, limit in ROW_PATH_MAX.items()}
            return self.head(np.ascontiguousarray(x[out_rows]))
        finally:
            self._plans = None
