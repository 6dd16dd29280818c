"""capibara6 CPU kernels: numpy wrappers around the cffi extension capibara6.kernels._kernels.

All float arrays are numpy float32, C-contiguous. Every op validates its arguments (TypeError for a
wrong type/dtype, ValueError for a wrong shape/contiguity/aliasing), accepts ``out=`` and returns the
output array. The GIL is released during every C call (cffi API mode). See capibara6/kernels/README.md.
"""
from __future__ import annotations

import numpy as np

try:
    from ._kernels import ffi as _ffi
    from ._kernels import lib as _lib
except ImportError as e:  # pragma: no cover
    raise ImportError(
        "capibara6.kernels._kernels is not built: run `pip install -e .` or `python capibara6/kernels/build_ffi.py` "
        f"({e})") from e

__all__ = [
    "set_num_threads", "get_num_threads", "use_threads", "build_info", "matmul", "softmax", "rmsnorm", "rope",
    "swiglu", "geglu", "gelu", "fp8_encode", "fp8_decode", "fp8_quantize_rows", "attention",
    "attention_paged", "qtype_block", "qmatmul", "qdequant", "crash_install", "crash_set_model", "crash_model", "crash_line",
]

_F32 = np.dtype(np.float32)
_U8 = np.dtype(np.uint8)
_I32 = np.dtype(np.int32)
_I64 = np.dtype(np.int64)
FP8_MAX = 448.0


# ------------------------------------------------------------------------------------ helpers
def _arr(name, a, dtype=_F32, ndims=None):
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name}: expected a numpy.ndarray of {dtype}, got {type(a).__name__}")
    if a.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype}, got {a.dtype}")
    if ndims is not None and a.ndim not in ndims:
        exp = " or ".join(f"{d}-D" for d in ndims)
        raise ValueError(f"{name}: expected a {exp} array, got shape {a.shape}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name}: array must be C-contiguous (use np.ascontiguousarray), "
                         f"got strides {a.strides} for shape {a.shape}")
    return a


def _ptr(a, ctype="float[]"):
    return _ffi.from_buffer(ctype, a)


def _wptr(a, ctype="float[]"):
    return _ffi.from_buffer(ctype, a, require_writable=True)


def _out(out, shape, dtype=_F32, inputs=(), inplace_ok=(), name="out"):
    """Allocate or validate an output array. inputs: arrays it must not overlap, except the
    ones in inplace_ok, which it may be exactly (same buffer, same shape) for in-place use."""
    if out is None:
        return np.empty(shape, dtype)
    _arr(name, out, dtype)
    if out.shape != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {out.shape}")
    if not out.flags.writeable:
        raise ValueError(f"{name}: array is read-only")
    for a in inputs:
        if a is None or (a is out and any(a is b for b in inplace_ok)):
            continue
        if not np.may_share_memory(out, a):
            continue
        exact = any(a is b for b in inplace_ok) and \
            a.__array_interface__["data"][0] == out.__array_interface__["data"][0] and \
            a.shape == out.shape and a.dtype == out.dtype
        if not exact:
            raise ValueError(f"{name}: must not overlap the inputs"
                             + (" (exact in-place use, out=<input>, is allowed)" if inplace_ok else ""))
    return out


def _rows(shape):
    r = 1
    for s in shape[:-1]:
        r *= s
    return r


# ------------------------------------------------------------------------------------ threads
def set_num_threads(n: int) -> None:
    """Threads used by matmul and attention (idle workers sleep on a condvar; default 1): the
    pool's size and default count, also for the calling thread (clears its use_threads)."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"n: expected int, got {type(n).__name__}")
    if n < 1:
        raise ValueError(f"n: expected >= 1, got {n}")
    _lib.c6_set_num_threads(int(n))


def get_num_threads() -> int:
    """Threads the calling thread's ops use (its use_threads count, else the pool's)."""
    return int(_lib.c6_get_num_threads())


def use_threads(n: int) -> int:
    """Ops called from this Python thread use n threads (0: the pool default set by
    set_num_threads); the pool grows to n if needed. Lets models and consensus experts running at
    once each keep their own share of the cores. Returns the effective count."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"n: expected int, got {type(n).__name__}")
    if n < 0:
        raise ValueError(f"n: expected >= 0, got {n}")
    return int(_lib.c6_use_threads(int(n)))


def build_info() -> dict:
    """Which code paths were compiled: {'neon', 'avx2', 'avx512', 'fma', 'force_portable', 'portable'}."""
    f = int(_lib.c6_build_flags())
    neon = bool(f & 1)
    return {"neon": neon, "avx2": bool(f & 2), "avx512": bool(f & 4), "fma": bool(f & 8),
            "force_portable": bool(f & 16), "portable": not neon}


# ------------------------------------------------------------------------------------ ops
def matmul(x, w, out=None):
    """y[M,N] = x[M,K] @ w[N,K]^T (w row-major [out, in], GGUF layout); x may be 1-D [K] -> y [N]."""
    _arr("x", x, ndims=(1, 2))
    _arr("w", w, ndims=(2,))
    K = x.shape[-1]
    if w.shape[1] != K:
        raise ValueError(f"w: expected shape (N, {K}) to match x's last dim K={K}, got {w.shape}")
    M = 1 if x.ndim == 1 else x.shape[0]
    N = w.shape[0]
    shape = (N,) if x.ndim == 1 else (M, N)
    out = _out(out, shape, inputs=(x, w))
    _lib.c6_matmul(_ptr(x), _ptr(w), _wptr(out), M, N, K)
    return out


def softmax(x, out=None):
    """Numerically stable softmax over the last axis of x [R, C] or [C]; out=x allowed."""
    _arr("x", x, ndims=(1, 2))
    out = _out(out, x.shape, inputs=(x,), inplace_ok=(x,))
    _lib.c6_softmax(_ptr(x), _wptr(out), _rows(x.shape), x.shape[-1])
    return out


def rmsnorm(x, weight, eps, out=None):
    """y = x / sqrt(mean(x^2, -1) + eps) * weight; x [R, D] or [D], weight [D]; out=x allowed."""
    _arr("x", x, ndims=(1, 2))
    _arr("weight", weight, ndims=(1,))
    D = x.shape[-1]
    if weight.shape[0] != D:
        raise ValueError(f"weight: expected shape ({D},), got {weight.shape}")
    eps = float(eps)
    out = _out(out, x.shape, inputs=(x, weight), inplace_ok=(x,))
    _lib.c6_rmsnorm(_ptr(x), _ptr(weight), _wptr(out), _rows(x.shape), D, eps)
    return out


def rope(x, positions, base, mode="normal", rot_dim=None, freq_scale=1.0, out=None):
    """Rotary embedding on x [T, H, D] at positions int32 [T]; rotates the first rot_dim dims of
    each head. mode 'normal' pairs (i, i+1) (llama), 'neox' pairs (i, i+rot_dim/2) (gemma, qwen2).
    theta_i = pos * freq_scale * base^(-2i/rot_dim), cos/sin in double. out=x allowed."""
    _arr("x", x, ndims=(3,))
    _arr("positions", positions, dtype=_I32, ndims=(1,))
    T, H, D = x.shape
    if positions.shape[0] != T:
        raise ValueError(f"positions: expected shape ({T},), got {positions.shape}")
    if mode not in ("normal", "neox"):
        raise ValueError(f"mode: expected 'normal' or 'neox', got {mode!r}")
    rot = D if rot_dim is None else int(rot_dim)
    if rot <= 0 or rot > D or rot % 2:
        raise ValueError(f"rot_dim: expected an even value in [2, {D}], got {rot_dim}")
    out = _out(out, x.shape, inputs=(x, positions), inplace_ok=(x,))
    _lib.c6_rope(_ptr(x), _ptr(positions, "int32_t[]"), _wptr(out), T, H, D, rot,
                 1 if mode == "neox" else 0, float(base), float(freq_scale))
    return out


def _binary(fn, g, u, out):
    _arr("g", g)
    _arr("u", u)
    if g.shape != u.shape:
        raise ValueError(f"u: expected shape {g.shape} (same as g), got {u.shape}")
    out = _out(out, g.shape, inputs=(g, u), inplace_ok=(g, u))
    fn(_ptr(g), _ptr(u), _wptr(out), g.size)
    return out


def swiglu(g, u, out=None):
    """silu(g) * u, any shape (g and u the same shape)."""
    return _binary(_lib.c6_swiglu, g, u, out)


def geglu(g, u, out=None):
    """gelu_tanh(g) * u, any shape."""
    return _binary(_lib.c6_geglu, g, u, out)


def gelu(x, out=None):
    """gelu_tanh(x) = 0.5x(1+tanh(sqrt(2/pi)(x+0.044715x^3))), any shape."""
    _arr("x", x)
    out = _out(out, x.shape, inputs=(x,), inplace_ok=(x,))
    _lib.c6_gelu(_ptr(x), _wptr(out), x.size)
    return out


def _exp(x, out=None):
    """exp(x) with the vectorised exp used by the other ops (exposed for testing)."""
    _arr("x", x)
    out = _out(out, x.shape, inputs=(x,), inplace_ok=(x,))
    _lib.c6_exp(_ptr(x), _wptr(out), x.size)
    return out


def _scale_arg(scale, shape, name="scale"):
    """-> (float32 array, stride): a scalar, or one scale per row (shape[:-1])."""
    if isinstance(scale, np.ndarray):
        if scale.dtype != _F32:
            raise TypeError(f"{name}: expected a float or a float32 array, got dtype {scale.dtype}")
        if scale.ndim == 0:
            return scale.reshape(1), 0
        if scale.shape != tuple(shape[:-1]):
            raise ValueError(f"{name}: expected a float or a float32 array of shape {tuple(shape[:-1])} "
                             f"(one scale per row), got {scale.shape}")
        _arr(name, scale)
        return scale, 1
    if isinstance(scale, (bool, np.bool_)) or not isinstance(scale, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name}: expected a float or a float32 array, got {type(scale).__name__}")
    return np.array([scale], _F32), 0


def fp8_encode(x, scale, out=None):
    """FP8 E4M3 (e4m3fn) codes of clip(x / scale, -448, 448): RNE, saturating, NaN kept.
    scale: float, or float32 array of shape x.shape[:-1] (one per row). Returns uint8 like x."""
    _arr("x", x)
    if x.ndim == 0:
        raise ValueError("x: expected at least 1-D, got a 0-d array")
    s, stride = _scale_arg(scale, x.shape)
    out = _out(out, x.shape, _U8)
    _lib.c6_fp8_encode(_ptr(x), _ptr(s), stride, _wptr(out, "uint8_t[]"), _rows(x.shape), x.shape[-1])
    return out


def fp8_decode(q, scale, out=None):
    """float32(e4m3fn(q)) * scale; scale as in fp8_encode."""
    _arr("q", q, dtype=_U8)
    if q.ndim == 0:
        raise ValueError("q: expected at least 1-D, got a 0-d array")
    s, stride = _scale_arg(scale, q.shape)
    out = _out(out, q.shape)
    _lib.c6_fp8_decode(_ptr(q, "uint8_t[]"), _ptr(s), stride, _wptr(out), _rows(q.shape), q.shape[-1])
    return out


def fp8_quantize_rows(x, out_q=None, out_scale=None):
    """Per-row FP8: scale = max|x|/448 over the last axis (1.0 for an all-zero row; NaN ignored),
    q = fp8_encode(x, scale). Returns (q uint8 [..., D], scale float32 [...])."""
    _arr("x", x)
    if x.ndim == 0:
        raise ValueError("x: expected at least 1-D, got a 0-d array")
    out_q = _out(out_q, x.shape, _U8, name="out_q")
    out_scale = _out(out_scale, x.shape[:-1], name="out_scale")
    _lib.c6_fp8_quantize_rows(_ptr(x), _wptr(out_q, "uint8_t[]"), _wptr(out_scale),
                              _rows(x.shape), x.shape[-1])
    return out_q, out_scale


def _kv_arrays(k, v, ndim, Hq, D):
    """k, v: a KV cache of `ndim` dims [..., Hkv, D], float32 or uint8 (FP8 e4m3fn), v of k's
    dtype and shape, for Hq query heads of head dim D (Hkv divides Hq)."""
    if not isinstance(k, np.ndarray):
        raise TypeError(f"k: expected a numpy.ndarray (float32 or uint8), got {type(k).__name__}")
    if k.dtype not in (_F32, _U8):
        raise TypeError(f"k: expected dtype float32 or uint8 (FP8 e4m3fn), got {k.dtype}")
    _arr("k", k, dtype=k.dtype, ndims=(ndim,))
    _arr("v", v, dtype=k.dtype, ndims=(ndim,))
    Hkv, Dk = k.shape[-2:]
    if Dk != D:
        raise ValueError(f"k: expected head dim {D} (from q), got shape {k.shape}")
    if v.shape != k.shape:
        raise ValueError(f"v: expected shape {k.shape} (same as k), got {v.shape}")
    if Hkv < 1 or Hq % Hkv:
        raise ValueError(f"k: number of kv heads ({Hkv}) must divide the number of q heads ({Hq})")


def _kv_scales(k, k_scale, v_scale, shape, dims):
    """An FP8 (uint8) cache needs k_scale, v_scale float32 of `shape` (its rows x KV heads; `dims`
    names them); any other needs none. Returns whether the cache is FP8."""
    fp8 = k.dtype == _U8
    if not fp8:
        if k_scale is not None or v_scale is not None:
            raise ValueError("k_scale, v_scale: only valid with an FP8 (uint8) cache")
        return False
    if k_scale is None or v_scale is None:
        raise ValueError(f"k_scale, v_scale: required (float32 {dims}) for an FP8 (uint8) cache")
    for name, sc in (("k_scale", k_scale), ("v_scale", v_scale)):
        _arr(name, sc, ndims=(len(shape),))
        if sc.shape != tuple(shape):
            raise ValueError(f"{name}: expected shape {tuple(shape)}, got {sc.shape}")
    return True


def attention(q, k, v, *, n_past, scale, window=0, k_scale=None, v_scale=None, ring=0, out=None):
    """Causal (optionally sliding-window) grouped-query attention with online softmax.
    q [T, Hq, D] float32 at positions n_past..n_past+T-1; k, v [S, Hkv, D] float32, or uint8 FP8
    e4m3fn with k_scale, v_scale float32 [S, Hkv]; only rows < n_past+T are read. Hq % Hkv == 0,
    head h uses kv head h // (Hq // Hkv). window > 0: key j visible iff p - j < window.
    ring > 0 (with a window): the cache is a ring of S == ring rows holding key j in row j % ring;
    ring >= window + T - 1 so every visible key is still there.
    Returns out [T, Hq, D] float32."""
    _arr("q", q, ndims=(3,))
    T, Hq, D = q.shape
    _kv_arrays(k, v, 3, Hq, D)
    S, Hkv, _ = k.shape
    if isinstance(n_past, bool) or not isinstance(n_past, (int, np.integer)) or n_past < 0:
        raise ValueError(f"n_past: expected an int >= 0, got {n_past!r}")
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 0:
        raise ValueError(f"window: expected an int >= 0, got {window!r}")
    if isinstance(ring, bool) or not isinstance(ring, (int, np.integer)) or ring < 0:
        raise ValueError(f"ring: expected an int >= 0, got {ring!r}")
    if ring:
        if window == 0 or ring < window + T - 1 or S != ring:
            raise ValueError(f"ring: needs a window and S == ring >= window + T - 1 "
                             f"(ring {ring}, window {window}, T {T}, S {S})")
    elif n_past + T > S:
        raise ValueError(f"k: cache has {S} rows, need n_past + T = {n_past + T}")
    fp8 = _kv_scales(k, k_scale, v_scale, (S, Hkv), "[S, Hkv]")
    out = _out(out, (T, Hq, D), inputs=(q, k, v, k_scale, v_scale))
    if T == 0:
        return out
    ks = _ptr(k_scale) if fp8 else _ffi.NULL
    vs = _ptr(v_scale) if fp8 else _ffi.NULL
    kt = "uint8_t[]" if fp8 else "float[]"
    rc = _lib.c6_attention(_ptr(q), _ptr(k, kt), _ptr(v, kt), ks, vs, 1 if fp8 else 0,
                           _wptr(out), T, Hq, Hkv, D, int(n_past), float(scale), int(window), int(ring))
    if rc != 0:
        raise MemoryError("attention: scratch allocation failed")
    return out


def _int_arg(name, x, minimum):
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)) or x < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {x!r}")
    return int(x)


def attention_paged(q, k, v, *, tables, q_start, n_past, block, scale, window=0,
                    k_scale=None, v_scale=None, out=None):
    """`attention` for several sequences in one call over a paged KV cache (a pool of blocks).
    q [T_total, Hq, D] float32: sequence i owns rows q_start[i] .. q_start[i+1]-1 (q_start int64
    [n_seq+1], q_start[0] == 0, non-decreasing, q_start[-1] == T_total; 0 rows allowed), at
    positions n_past[i], n_past[i]+1, ... (n_past int64 [n_seq], >= 0).
    k, v [n_blocks, block, Hkv, D] float32, or uint8 FP8 e4m3fn with k_scale, v_scale float32
    [n_blocks, block, Hkv]. tables int32 [n_seq, max_blocks]: key j of sequence i is row j % block
    of block tables[i, j // block]; n_past[i] + rows_i <= max_blocks * block. Only the blocks
    holding a key some query of the sequence can see are read (keys max(0, n_past-window+1) ..
    n_past+rows-1); other entries may be -1 (freed), every entry read must be in [0, n_blocks)
    (checked in C before anything is read: ValueError naming `tables`). Hq % Hkv == 0, head h uses
    kv head h // (Hq // Hkv); window > 0: key j visible from position p iff j <= p < j + window.
    Per sequence the result is bit-identical to `attention(q_i, K_i, V_i, n_past=n_past[i],
    scale=scale, window=window)` on its keys gathered contiguously (same tiles and key split; the
    row address is the only difference), for any mix of sequences. One parallel job for all
    sequences. Returns out [T_total, Hq, D] float32."""
    _arr("q", q, ndims=(3,))
    T, Hq, D = q.shape
    _kv_arrays(k, v, 4, Hq, D)
    n_blocks, blk, Hkv, _ = k.shape
    block = _int_arg("block", block, 1)
    if blk != block:
        raise ValueError(f"k: expected shape (n_blocks, block={block}, Hkv, D), got {k.shape}")
    window = _int_arg("window", window, 0)
    _arr("tables", tables, dtype=_I32, ndims=(2,))
    n_seq, max_blocks = tables.shape
    _arr("q_start", q_start, dtype=_I64, ndims=(1,))
    _arr("n_past", n_past, dtype=_I64, ndims=(1,))
    if q_start.shape != (n_seq + 1,):
        raise ValueError(f"q_start: expected shape ({n_seq + 1},) (n_seq + 1, n_seq = len(tables)), "
                         f"got {q_start.shape}")
    if n_past.shape != (n_seq,):
        raise ValueError(f"n_past: expected shape ({n_seq},) (n_seq = len(tables)), got {n_past.shape}")
    fp8 = _kv_scales(k, k_scale, v_scale, k.shape[:3], "[n_blocks, block, Hkv]")
    out = _out(out, (T, Hq, D), inputs=(q, k, v, k_scale, v_scale))
    ks = _ptr(k_scale) if fp8 else _ffi.NULL
    vs = _ptr(v_scale) if fp8 else _ffi.NULL
    kt = "uint8_t[]" if fp8 else "float[]"
    err = _ffi.new("int64_t[2]")
    rc = _lib.c6_attention_paged(_ptr(q), _ptr(k, kt), _ptr(v, kt), ks, vs, 1 if fp8 else 0, _wptr(out),
                                 n_seq, T, _ptr(q_start, "int64_t[]"), _ptr(n_past, "int64_t[]"),
                                 _ptr(tables, "int32_t[]"), max_blocks, block, n_blocks, Hq, Hkv, D,
                                 float(scale), window, err)
    if rc != 0:
        _paged_error(rc, int(err[0]), int(err[1]), T, q_start, n_past, tables, block, n_blocks, window)
    return out


def _paged_error(rc, i, b, T, q_start, n_past, tables, block, n_blocks, window):
    """Raise the error for c6_attention_paged's return code rc at sequence i, table slot b."""
    if rc == -1:
        raise MemoryError("attention_paged: scratch allocation failed")
    if rc == -2:
        where = f" (at sequence {i}: q_start[{i}] = {q_start[i]}, q_start[{i + 1}] = {q_start[i + 1]})" if i >= 0 else \
            f" (q_start[0] = {q_start[0]}, q_start[-1] = {q_start[-1]})"
        raise ValueError(f"q_start: expected 0 = q_start[0] <= q_start[1] <= ... <= q_start[-1] = T_total = {T}{where}")
    if rc == -3:
        raise ValueError(f"n_past: expected values >= 0, got n_past[{i}] = {n_past[i]}")
    if rc == -4:
        need = int(n_past[i]) + int(q_start[i + 1] - q_start[i])
        raise ValueError(f"tables: too small: sequence {i} needs n_past + rows = {need} key positions, "
                         f"tables hold max_blocks * block = {tables.shape[1]} * {block} = {tables.shape[1] * block}")
    if rc == -5:
        raise ValueError(f"tables: entry tables[{i}, {b}] = {tables[i, b]} is read (keys {b * block}..{(b + 1) * block - 1} "
                         f"of sequence {i}, n_past {n_past[i]}, window {window}) but is not a block id in "
                         f"[0, {n_blocks})")
    raise ValueError(f"attention_paged: invalid arguments (code {rc})")


# ------------------------------------------------------------------------------------ quantized
_QBLOCK: dict = {}


def qtype_block(wtype):
    """(values, bytes) per block for a GGUF/ggml type id qmatmul supports, else None."""
    wtype = int(wtype)
    if wtype not in _QBLOCK:  # asked on every qmatmul call: remember the answer
        v, b = _ffi.new("int *"), _ffi.new("int *")
        _QBLOCK[wtype] = (int(v[0]), int(b[0])) if _lib.c6_qtype_block(wtype, v, b) else None
    return _QBLOCK[wtype]


def _qweight(w, wtype):
    _arr("w", w, dtype=_U8, ndims=(2,))
    blk = qtype_block(wtype)
    if blk is None:
        raise ValueError(f"wtype: ggml type {wtype} is not supported (Q4_0, Q5_0, Q8_0, Q4_K, Q5_K, Q6_K)")
    values, nbytes = blk
    if w.shape[1] % nbytes:
        raise ValueError(f"w: row of {w.shape[1]} bytes is not a whole number of {nbytes}-byte blocks")
    return w.shape[1] // nbytes * values


def qmatmul(x, w, wtype, act_bits=8, out=None):
    """y[M,N] = x[M,K] @ W[N,K]^T with W in GGUF block layout: uint8 [N, row_bytes] of ggml type
    `wtype`. act_bits=8: x is quantized per row to Q8_0 or Q8_K first, as llama.cpp's CPU backend
    does; act_bits=16: to 16 bits per 32 values (scale amax/32767), within ~1e-5 of fp32."""
    if act_bits not in (8, 16):
        raise ValueError(f"act_bits: expected 8 or 16, got {act_bits!r}")
    _arr("x", x, ndims=(1, 2))
    K = _qweight(w, wtype)
    if x.shape[-1] != K:
        raise ValueError(f"x: expected last dim {K} (the weight's), got shape {x.shape}")
    M = 1 if x.ndim == 1 else x.shape[0]
    N = w.shape[0]
    out = _out(out, (N,) if x.ndim == 1 else (M, N), inputs=(x, w))
    fn = _lib.c6_qmatmul if act_bits == 8 else _lib.c6_qmatmul16
    rc = fn(_ptr(x), _ptr(w, "uint8_t[]"), int(wtype), _wptr(out), M, N, K)
    if rc == -2:
        raise MemoryError("qmatmul: allocation failed")
    return out


def qdequant(w, wtype, out=None):
    """float32 [R, K] values of the GGUF-block rows w (uint8 [R, row_bytes], ggml type wtype)."""
    K = _qweight(w, wtype)
    out = _out(out, (w.shape[0], K), inputs=(w,))
    if _lib.c6_qdequant(_ptr(w, "uint8_t[]"), int(wtype), _wptr(out), w.shape[0], K) == -2:
        raise MemoryError("qdequant: allocation failed")
    return out


# ------------------------------------------------------------------------------------ crash log
CRASH_MODEL_FROM = ("none", "thread", "last")  # c6_crash_model's return value -> its meaning


def crash_install(fd: int) -> None:
    """Put the fatal-signal line writer (SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT) in front of the
    handlers installed now, writing to file descriptor fd; idempotent. See capibara6/crash.py."""
    if _lib.c6_crash_install(int(fd)) != 0:
        raise OSError(_ffi.errno, f"crash_install: sigaction failed (fd {fd})")


def crash_set_model(model_id: str | None) -> None:
    """The calling thread's model id for the crash line (None or "" = none). ~0.4 us (measured):
    call it per generation, not per token. Ids are cut to C6_CRASH_ID - 1 UTF-8 bytes."""
    _lib.c6_crash_set_model(model_id.encode("utf-8") if model_id else _ffi.NULL)


def crash_model() -> tuple[str | None, str]:
    """(id, source) the crash line would name from this thread: source 'thread' (its own),
    'last' (the last id any thread set) or 'none'."""
    buf = _ffi.new("char[]", _lib.C6_CRASH_ID)
    src = CRASH_MODEL_FROM[_lib.c6_crash_model(buf, _lib.C6_CRASH_ID)]
    return (_ffi.string(buf).decode("utf-8", "replace") or None, src)


def crash_line(signum: int, code: int = 0, addr: int = 0) -> str:
    """The JSON line the handler would write for this signal from this thread (for tests)."""
    buf = _ffi.new("char[]", 2048)
    n = _lib.c6_crash_format(int(signum), int(code), int(addr), buf, 2048)
    return bytes(_ffi.buffer(buf, n)).decode("utf-8", "replace")
