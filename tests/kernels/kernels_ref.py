"""Float64 / bit-exact numpy references and size switches for the kernel tests.

Runs unchanged on the host and under qemu-aarch64 (numpy 1.24, no ml_dtypes): there
SMALL is true and sizes shrink (the FP8 sweep is 10^5 values instead of 10^6)."""
import os
import platform

import numpy as np

IS_ARM = platform.machine() in ("aarch64", "arm64")
SMALL = IS_ARM or os.environ.get("CAPIBARA6_TEST_SMALL") == "1"
U = 2.0 ** -24  # float32 unit roundoff

try:
    import ml_dtypes  # noqa: F401
    HAVE_ML_DTYPES = True
except ImportError:
    HAVE_ML_DTYPES = False


def fp8_ref_encode(v):
    """Bit-exact e4m3fn encoding of float32 values v (already divided by the scale), RNE,
    saturating to +-448, NaN -> sign|0x7F. Pure numpy (float64 arithmetic is exact here)."""
    v = np.asarray(v, np.float32)
    bits = v.view(np.uint32)
    sign = ((bits >> 24) & 0x80).astype(np.uint8)
    a = np.abs(v.astype(np.float64))
    nan = np.isnan(a)
    a = np.where(nan, 0.0, np.minimum(a, 448.0))
    code = np.zeros(a.shape, np.int64)
    sub = a < 2.0 ** -6
    code[sub] = np.rint(a[sub] * 512.0).astype(np.int64)      # 0..8 (8 == smallest normal)
    nrm = ~sub
    if nrm.any():
        _, e2 = np.frexp(a[nrm])                                # a = m * 2^e2, m in [0.5, 1)
        e = e2 - 1
        q = np.rint(a[nrm] / np.ldexp(1.0, e - 3)).astype(np.int64)  # 8..16, half-even
        code[nrm] = ((e + 7) << 3) + (q - 8)
    code = np.where(nan, 0x7F, code)
    return (code.astype(np.uint8) | sign).astype(np.uint8)


def fp8_ref_table():
    """float32 value of each of the 256 e4m3fn codes (NaN for 0x7F/0xFF)."""
    c = np.arange(256)
    e = (c >> 3) & 15
    m = c & 7
    v = np.where(e == 0, m * 2.0 ** -9, (1 + m / 8.0) * np.exp2(e - 7.0))
    v = np.where((e == 15) & (m == 7), np.nan, v)
    v = np.where(c & 0x80, -v, v)
    return v.astype(np.float32)


def ref_attention(q, k, v, n_past, scale, window=0):
    """float64 causal / sliding-window GQA attention on float arrays."""
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    g = Hq // Hkv
    L = n_past + T
    q64 = q.astype(np.float64)
    k64 = k[:L].astype(np.float64)
    v64 = v[:L].astype(np.float64)
    p = n_past + np.arange(T)[:, None]
    j = np.arange(L)[None, :]
    mask = j <= p
    if window > 0:
        mask &= (p - j) < window
    out = np.zeros((T, Hq, D))
    for h in range(Hq):
        s = q64[:, h, :] @ k64[:, h // g, :].T * float(np.float32(scale))
        s = np.where(mask, s, -np.inf)
        s -= s.max(axis=1, keepdims=True)
        e = np.exp(s)
        e /= e.sum(axis=1, keepdims=True)
        out[:, h, :] = e @ v64[:, h // g, :]
    return out
