"""Plain-numpy reference of the `kernels` API (same names, signatures and semantics).

Used as the correctness reference in tests and as a fallback while the C kernels are not built.
It is written for clarity, not speed: the engine's hot path runs on `kernels`.
"""

from __future__ import annotations

import math

import numpy as np

try:  # ml_dtypes gives an exact E4M3 (OCP e4m3fn) cast; optional outside the tests
    import ml_dtypes

    _E4M3 = ml_dtypes.float8_e4m3fn
except ImportError:  # pragma: no cover - ml_dtypes is a dev dependency
    _E4M3 = None

FP8_MAX = 448.0
_threads = 1


def set_num_threads(n: int) -> None:
    global _threads
    _threads = max(1, int(n))


def get_num_threads() -> int:
    return _threads


def use_threads(n: int) -> int:
    return max(1, int(n)) if n else _threads


def _put(res: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    if out is None:
        return np.ascontiguousarray(res, dtype=np.float32)
    out[...] = res
    return out


def matmul(x: np.ndarray, w: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """y = x @ w.T with w [N, K] row-major (GGUF layout)."""
    return _put(x @ w.T, out)


def _f16(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, np.float32).astype(np.float16).astype(np.float32)


def quantize_q8_0(x: np.ndarray) -> np.ndarray:
    """Activations as llama.cpp's Q8_0 (x86 path), dequantized: per 32, q = rint(x*127/amax), d = fp16(amax/127)."""
    b = x.reshape(-1, 32).astype(np.float32)
    amax = np.abs(b).max(axis=1, keepdims=True)
    inv = np.where(amax > 0, np.float32(127.0) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    return (np.rint(b * inv) * _f16(amax / np.float32(127.0))).reshape(x.shape).astype(np.float32)


def quantize_q8_k(x: np.ndarray) -> np.ndarray:
    """Activations as ggml's quantize_row_q8_K_ref, dequantized: per 256, the first largest |x| -> -127."""
    b = x.reshape(-1, 256).astype(np.float32)
    mx = b[np.arange(b.shape[0]), np.abs(b).argmax(axis=1)][:, None]
    iscale = np.where(mx != 0, np.float32(-127.0) / np.where(mx != 0, mx, 1), 0).astype(np.float32)
    d = np.where(iscale != 0, 1 / np.where(iscale != 0, iscale, 1), 0).astype(np.float32)
    return (np.minimum(127, np.rint(iscale * b)) * d).reshape(x.shape).astype(np.float32)


_K_QUANTS = {12, 13, 14}  # Q4_K, Q5_K, Q6_K: activations as Q8_K; Q4_0/Q5_0/Q8_0: as Q8_0


def qdequant(w: np.ndarray, wtype: int, out: np.ndarray | None = None) -> np.ndarray:
    from gguf import GGMLQuantizationType, quants

    return _put(quants.dequantize(w, GGMLQuantizationType(wtype)), out)


def quantize_q16(x: np.ndarray) -> np.ndarray:
    """Activations at 16 bits per 32 (kernels' act_bits=16), dequantized: q = rint(x*32767/amax)."""
    b = x.reshape(-1, 32).astype(np.float32)
    amax = np.abs(b).max(axis=1, keepdims=True)
    inv = np.where(amax > 0, np.float32(32767.0) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    return (np.clip(np.rint(b * inv), -32767, 32767) * (amax / np.float32(32767.0))).reshape(x.shape).astype(np.float32)


def qmatmul(x: np.ndarray, w: np.ndarray, wtype: int, act_bits: int = 8, out: np.ndarray | None = None) -> np.ndarray:
    """y = quantize(x) @ dequant(w).T in float64: the exact integer block sums, rounded once."""
    if act_bits == 16:
        xq = quantize_q16(x)
    else:
        xq = quantize_q8_k(x) if wtype in _K_QUANTS else quantize_q8_0(x)
    return _put(xq.astype(np.float64) @ qdequant(w, wtype).astype(np.float64).T, out)


def softmax(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    m = x.max(axis=-1, keepdims=True)
    e = np.exp(x - m)
    return _put(e / e.sum(axis=-1, keepdims=True), out)


def rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float, out: np.ndarray | None = None) -> np.ndarray:
    x64 = x.astype(np.float64)
    r = x64 / np.sqrt(np.mean(x64 * x64, axis=-1, keepdims=True) + eps)
    return _put(r * weight, out)


def rope(
    x: np.ndarray,
    positions: np.ndarray,
    base: float,
    mode: str = "normal",
    rot_dim: int | None = None,
    freq_scale: float = 1.0,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Rotary embedding on x [T, H, D]; ggml's NORMAL (adjacent pairs) or NEOX (split halves)."""
    t, _, d = x.shape
    rd = d if rot_dim is None else rot_dim
    half = rd // 2
    inv = base ** (-2.0 * np.arange(half, dtype=np.float64) / rd)
    theta = positions.astype(np.float64)[:, None] * freq_scale * inv[None, :]  # [T, half]
    cos = np.cos(theta)[:, None, :]
    sin = np.sin(theta)[:, None, :]
    y = x.astype(np.float64).copy()
    if mode == "normal":
        a, b = y[..., 0:rd:2].copy(), y[..., 1:rd:2].copy()
        y[..., 0:rd:2] = a * cos - b * sin
        y[..., 1:rd:2] = a * sin + b * cos
    elif mode == "neox":
        a, b = y[..., :half].copy(), y[..., half:rd].copy()
        y[..., :half] = a * cos - b * sin
        y[..., half:rd] = a * sin + b * cos
    else:
        raise ValueError(f"unknown rope mode {mode!r}")
    assert t == positions.shape[0]
    return _put(y, out)


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def _gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def swiglu(g: np.ndarray, u: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    g64 = g.astype(np.float64)
    return _put(_silu(g64) * u, out)


def geglu(g: np.ndarray, u: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    g64 = g.astype(np.float64)
    return _put(_gelu_tanh(g64) * u, out)


def gelu(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    return _put(_gelu_tanh(x.astype(np.float64)), out)


def _row_scale(scale: np.ndarray | float, ndim: int) -> np.ndarray:
    """A float, or one scale per row (shape [...], as kernels takes it) -> broadcastable."""
    s = np.asarray(scale, np.float32)
    return s[..., None] if s.ndim == ndim - 1 and s.ndim > 0 else s


def fp8_encode(x: np.ndarray, scale: np.ndarray | float) -> np.ndarray:
    """x / scale -> E4M3 bytes (saturating at +-448)."""
    if _E4M3 is None:  # pragma: no cover
        raise RuntimeError("ml_dtypes is required for the numpy FP8 reference")
    y = np.clip(np.asarray(x, np.float32) / _row_scale(scale, np.ndim(x)), -FP8_MAX, FP8_MAX)
    return y.astype(_E4M3).view(np.uint8)


def fp8_decode(q: np.ndarray, scale: np.ndarray | float) -> np.ndarray:
    if _E4M3 is None:  # pragma: no cover
        raise RuntimeError("ml_dtypes is required for the numpy FP8 reference")
    return q.view(_E4M3).astype(np.float32) * _row_scale(scale, q.ndim)


def fp8_quantize_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row (last axis) scale = amax / 448, so every row uses the full E4M3 range."""
    amax = np.abs(x).max(axis=-1).astype(np.float32)
    scale = np.where(amax > 0, amax / FP8_MAX, 1.0).astype(np.float32)
    return fp8_encode(x, scale), scale


def attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    *,
    n_past: int,
    scale: float,
    window: int = 0,
    k_scale: np.ndarray | None = None,
    v_scale: np.ndarray | None = None,
    ring: int = 0,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Causal GQA attention of q [T,Hq,D] (positions n_past..) over cache rows 0..n_past+T-1
    (ring > 0: positions max(0, n_past+T-ring).. in rows position % ring)."""
    t, hq, _d = q.shape
    s = n_past + t
    first = max(0, s - ring) if ring else 0
    rows = np.arange(first, s) % ring if ring else np.arange(s)
    kk, vv = k[rows], v[rows]
    if kk.dtype == np.uint8:
        assert k_scale is not None and v_scale is not None
        kk = fp8_decode(kk, k_scale[rows])
        vv = fp8_decode(vv, v_scale[rows])
    hkv = kk.shape[1]
    group = hq // hkv
    kk = np.repeat(kk.astype(np.float64), group, axis=1)  # [S, Hq, D]
    vv = np.repeat(vv.astype(np.float64), group, axis=1)
    scores = np.einsum("thd,shd->hts", q.astype(np.float64), kk) * scale  # [Hq, T, S]
    pos = n_past + np.arange(t)[:, None]
    j = np.arange(first, s)[None, :]
    allowed = j <= pos
    if window > 0:
        allowed &= (pos - j) < window
    scores = np.where(allowed[None], scores, -np.inf)
    scores -= scores.max(axis=-1, keepdims=True)
    p = np.exp(scores)
    p /= p.sum(axis=-1, keepdims=True)
    res = np.einsum("hts,shd->thd", p, vv)
    return _put(res, out)


def attention_paged(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    *,
    tables: np.ndarray,
    q_start: np.ndarray,
    n_past: np.ndarray,
    block: int,
    scale: float,
    window: int = 0,
    k_scale: np.ndarray | None = None,
    v_scale: np.ndarray | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """`attention` per sequence over a paged cache (kernels.attention_paged's semantics): sequence i
    owns q rows q_start[i]..q_start[i+1]-1 at positions n_past[i].., key j in row j % block of
    block tables[i, j // block] of k, v [n_blocks, block, Hkv, D] (uint8 FP8: scales
    [n_blocks, block, Hkv]). Only blocks holding visible keys are read (others may be -1);
    ValueError for bad q_start, n_past, too small tables or a read entry outside [0, n_blocks)."""
    t_total, hq, d = q.shape
    n_blocks, hkv = k.shape[0], k.shape[2]
    n_seq, max_blocks = tables.shape
    if k.shape[1] != block:
        raise ValueError(f"k: expected shape (n_blocks, block={block}, Hkv, D), got {k.shape}")
    qs = np.asarray(q_start, np.int64)
    npast = np.asarray(n_past, np.int64)
    if qs.shape != (n_seq + 1,) or qs[0] != 0 or qs[-1] != t_total or np.any(np.diff(qs) < 0):
        raise ValueError(f"q_start: expected 0 = q_start[0] <= ... <= q_start[-1] = T_total = {t_total}, got {qs}")
    if npast.shape != (n_seq,) or np.any(npast < 0):
        raise ValueError(f"n_past: expected {n_seq} values >= 0, got {npast}")
    res = np.zeros((t_total, hq, d), np.float32)
    for i in range(n_seq):
        t0, t1, p = int(qs[i]), int(qs[i + 1]), int(npast[i])
        s = p + t1 - t0
        if s > max_blocks * block:
            raise ValueError(f"tables: too small: sequence {i} needs {s} key positions, holds {max_blocks * block}")
        if t1 == t0:
            continue
        lo = max(0, p - window + 1) if window > 0 else 0
        for b in range(lo // block, (s - 1) // block + 1):
            if not 0 <= tables[i, b] < n_blocks:
                raise ValueError(f"tables: entry tables[{i}, {b}] = {tables[i, b]} is read but is not a block id in [0, {n_blocks})")
        pos = np.arange(lo, s)  # keys before lo are invisible to every query: left as zeros
        blk, row = tables[i, pos // block], pos % block
        kk = np.zeros((s, hkv, d), k.dtype)
        vv = np.zeros((s, hkv, d), v.dtype)
        kk[lo:], vv[lo:] = k[blk, row], v[blk, row]
        kw: dict = {}
        if k.dtype == np.uint8:
            assert k_scale is not None and v_scale is not None
            ks, vs = np.ones((s, hkv), np.float32), np.ones((s, hkv), np.float32)
            ks[lo:], vs[lo:] = k_scale[blk, row], v_scale[blk, row]
            kw = {"k_scale": ks, "v_scale": vs}
        res[t0:t1] = attention(q[t0:t1], kk, vv, n_past=p, scale=scale, window=window, **kw)
    return _put(res, out)
