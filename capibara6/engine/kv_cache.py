"""Per-layer K/V cache in fp32, fp16 or FP8 E4M3 (one fp32 scale per token and KV head).

FP8 keys are stored minus a per-layer, per-head constant vector (the mean key of the first
chunk). That is exact: it shifts every score of a query by the same q.shift, which softmax
ignores; and it shrinks what E4M3's 3-bit mantissa has to represent (Gemma's keys share a large
common component), cutting the FP8 error in the attention scores.

Storage grows in chunks of `grow_tokens` up to n_ctx (never allocated for n_ctx up front), so a
short conversation on a long-context model holds only what it uses; `nbytes()` reports exactly
the arrays held. A sliding-window layer (windows[il] > 0) keeps a ring of window + max_chunk - 1
rows, position p in row p % ring: everything a query can still see, whatever the context length
(Gemma 3: 5 of every 6 layers).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import ModuleType

import numpy as np

KV_DTYPES = ("fp32", "fp16", "fp8")


def kv_bytes_per_token(dtype: str, n_layer: int, n_head_kv: int, head_dim_k: int, head_dim_v: int) -> int:
    """K and V bytes one position holds over all layers (fp8: the E4M3 bytes + two fp32 scales per KV head)."""
    h, d = n_head_kv, head_dim_k + head_dim_v
    per = {"fp32": 4 * h * d, "fp16": 2 * h * d, "fp8": h * d + 8 * h}
    return per[dtype] * n_layer


@dataclass
class _Layer:
    k: np.ndarray  # [cap, Hkv, Dk] float32 | float16 | uint8 (FP8 bytes)
    v: np.ndarray  # [cap, Hkv, Dv]
    k_scale: np.ndarray = field(default_factory=lambda: np.ones((0, 0), np.float32))  # [cap, Hkv] (fp8)
    v_scale: np.ndarray = field(default_factory=lambda: np.ones((0, 0), np.float32))
    k_shift: np.ndarray | None = None  # [Hkv, Dk] subtracted from keys before FP8 (fp8 only)
    ring: int = 0  # > 0: a sliding-window layer's ring size (rows held at most)


class KVCache:
    def __init__(
        self,
        ops: ModuleType,
        *,
        n_layer: int,
        n_ctx: int,
        n_head_kv: int,
        head_dim_k: int,
        head_dim_v: int,
        dtype: str = "fp32",
        grow_tokens: int = 256,
        windows: tuple[int, ...] = (),
        max_chunk: int = 1,
    ) -> None:
        """windows: per layer, the sliding window (0: full attention); max_chunk: the most tokens
        one forward pass stores (a ring must also hold the chunk being written)."""
        if dtype not in KV_DTYPES:
            raise ValueError(f"kv_cache must be one of {KV_DTYPES}, not {dtype!r}")
        self.ops = ops
        self.dtype = dtype
        self.n_ctx = n_ctx
        self.n_head_kv = n_head_kv
        self.head_dim_k = head_dim_k
        self.head_dim_v = head_dim_v
        self.grow_tokens = grow_tokens
        self.n_layer = n_layer
        self.capacity = 0
        self.windows = tuple(windows) or (0,) * n_layer
        self.rings = tuple(w + max(1, max_chunk) - 1 if w > 0 and w + max_chunk - 1 < n_ctx else 0
                           for w in self.windows)
        self.layers: list[_Layer] = [self._alloc(0, r) for r in self.rings]

    def _alloc(self, cap: int, ring: int) -> _Layer:
        h, dk, dv = self.n_head_kv, self.head_dim_k, self.head_dim_v
        rows = min(cap, ring) if ring else cap
        if self.dtype == "fp8":
            return _Layer(
                np.zeros((rows, h, dk), np.uint8),
                np.zeros((rows, h, dv), np.uint8),
                np.ones((rows, h), np.float32),
                np.ones((rows, h), np.float32),
                ring=ring,
            )
        dt = np.float32 if self.dtype == "fp32" else np.float16
        return _Layer(np.zeros((rows, h, dk), dt), np.zeros((rows, h, dv), dt), ring=ring)

    def reserve(self, n_tokens: int) -> None:
        """Make room for positions 0..n_tokens-1 (grows by whole chunks, copies what is held)."""
        if n_tokens > self.n_ctx:
            raise ValueError(f"KV cache holds at most n_ctx={self.n_ctx} tokens, asked {n_tokens}")
        if n_tokens <= self.capacity:
            return
        cap = min(self.n_ctx, -(-n_tokens // self.grow_tokens) * self.grow_tokens)
        for i, old in enumerate(self.layers):
            if old.ring and old.k.shape[0] == old.ring:
                continue  # a full ring never grows
            new = self._alloc(cap, old.ring)
            new.k_shift = old.k_shift
            n = old.k.shape[0]  # a ring that is not full yet has not wrapped: rows = positions
            new.k[:n], new.v[:n] = old.k[:n], old.v[:n]
            if self.dtype == "fp8":
                new.k_scale[:n], new.v_scale[:n] = old.k_scale[:n], old.v_scale[:n]
            self.layers[i] = new
        self.capacity = cap

    def store(self, il: int, pos: int, k: np.ndarray, v: np.ndarray) -> None:
        """Write k [T,Hkv,Dk], v [T,Hkv,Dv] (float32) at positions pos..pos+T-1."""
        t = k.shape[0]
        lay = self.layers[il]
        rows: slice | np.ndarray = slice(pos, pos + t)
        if lay.ring and pos + t > lay.k.shape[0]:
            rows = np.arange(pos, pos + t) % lay.ring
        if self.dtype == "fp8":
            if pos == 0 or lay.k_shift is None:
                # Mean of the first chunk without position 0 (BOS is an outlier attention sink).
                has_rows = pos == 0 and t > 1
                lay.k_shift = k[1:].mean(axis=0, dtype=np.float32) if has_rows else np.zeros_like(k[0])
            qk, sk = self.ops.fp8_quantize_rows(np.ascontiguousarray(k - lay.k_shift))
            qv, sv = self.ops.fp8_quantize_rows(np.ascontiguousarray(v))
            lay.k[rows], lay.k_scale[rows] = qk, sk
            lay.v[rows], lay.v_scale[rows] = qv, sv
        else:
            lay.k[rows] = k
            lay.v[rows] = v

    def attention_args(self, il: int, n_rows: int) -> dict[str, object]:
        """Arguments for ops.attention over positions 0..n_rows-1 (fp16 is widened: kernels take
        fp32/fp8); a ring that has wrapped is passed with its size."""
        lay = self.layers[il]
        wrapped = lay.ring and n_rows > lay.k.shape[0]
        args: dict[str, object] = {"ring": lay.ring} if wrapped else {}
        if self.dtype == "fp8":
            return {**args, "k": lay.k, "v": lay.v, "k_scale": lay.k_scale, "v_scale": lay.v_scale}
        if self.dtype == "fp16":
            n = lay.k.shape[0] if wrapped else n_rows
            return {**args, "k": lay.k[:n].astype(np.float32), "v": lay.v[:n].astype(np.float32)}
        return {**args, "k": lay.k, "v": lay.v}

    def attend(self, il: int, q: np.ndarray, k: np.ndarray, v: np.ndarray, *, n_past: int, scale: float,
               window: int) -> np.ndarray:
        """Store k, v [T, Hkv, D] at positions n_past.., then attention of q [T, Hq, D] over the cache."""
        self.store(il, n_past, k, v)
        out: np.ndarray = self.ops.attention(q, n_past=n_past, scale=scale, window=window,
                                             **self.attention_args(il, n_past + q.shape[0]))
        return out

    def reusable_prefix(self, held: int, common: int) -> int:
        """Of `common` leading positions shared with a new sequence, how many the cache can keep
        when it holds `held` positions: rings have overwritten positions < held - ring, and the
        next query (at position n) must still see n - window + 1."""
        for ring, w in zip(self.rings, self.windows):
            if ring and held > ring and common - w + 1 < held - ring:
                return 0
        return common

    def nbytes(self) -> int:
        total = 0
        for lay in self.layers:
            total += lay.k.nbytes + lay.v.nbytes
            total += lay.k_scale.nbytes + lay.v_scale.nbytes  # zero-sized unless fp8
            if lay.k_shift is not None:
                total += lay.k_shift.nbytes
        return total

    def bytes_per_token(self) -> int:
        return kv_bytes_per_token(self.dtype, self.n_layer, self.n_head_kv, self.head_dim_k, self.head_dim_v)
