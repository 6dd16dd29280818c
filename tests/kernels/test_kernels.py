"""capibara6 kernels vs float64 numpy references (and bit-exact FP8 references).

Tolerances (relative unless said otherwise; float32 unit roundoff u = 2^-24 ~ 6e-8):
  exp, silu/swiglu: |err| <= 5e-7 |ref|       softmax: 1e-6 |ref|      rmsnorm: 1e-5 |ref|
  gelu/geglu: |err| <= 4u(1 + |2z|) |ref|, z = sqrt(2/pi)(x + 0.044715x^3): <= 2e-6 for |x| <= 3,
      ~1.5e-5 at x = -10 (computed as x*sigmoid(2z); gelu itself is ill-conditioned for x << 0)
  matmul: |err| <= 2 sqrt(K) u (|x| @ |w|^T) + 1e-30
  rope: |err| <= 4 u max|x| (cos/sin in double, rotation in float32)
  attention fp32 and FP8 (vs float64 on the dequantized cache): max|err| <= 1e-5 max|ref|
  FP8 encode: bit-exact; decode: exact.
"""
import os

import numpy as np
import pytest
from kernels_ref import HAVE_ML_DTYPES, IS_ARM, SMALL, U, fp8_ref_encode, fp8_ref_table, ref_attention

from capibara6 import kernels


def relerr(y, ref, floor=1e-30):
    return np.max(np.abs(y.astype(np.float64) - ref) / np.maximum(np.abs(ref), floor))


# ------------------------------------------------------------------------------ build / threads
def test_build_info():
    info = kernels.build_info()
    assert set(info) >= {"neon", "portable"}
    if IS_ARM and not info["force_portable"]:
        assert info["neon"] is True, "aarch64 build must use the NEON paths"
        print("NEON paths compiled in and tested")
    else:
        assert info["portable"] is True


def test_threads_set_get(threads):
    assert kernels.get_num_threads() >= 1
    kernels.set_num_threads(2)
    assert kernels.get_num_threads() == 2
    kernels.set_num_threads(1)
    assert kernels.get_num_threads() == 1
    with pytest.raises(ValueError):
        kernels.set_num_threads(0)
    with pytest.raises(TypeError):
        kernels.set_num_threads(1.5)


def test_use_threads_is_per_calling_thread(rng, threads):
    """Each Python thread (a model, a consensus expert) may run its ops on its own share of the
    cores; results do not depend on it."""
    import threading
    kernels.set_num_threads(2)
    x = rng.standard_normal((3, 256)).astype(np.float32)
    w = rng.standard_normal((700, 256)).astype(np.float32)
    want = kernels.matmul(x, w)
    seen = {}

    def expert(name, n):
        seen[name] = (kernels.use_threads(n), kernels.get_num_threads(), kernels.matmul(x, w))

    for name, n in (("one", 1), ("three", 3), ("default", 0)):
        t = threading.Thread(target=expert, args=(name, n))
        t.start()
        t.join()
    assert seen["one"][:2] == (1, 1)
    assert seen["three"][:2] == (3, 3)  # the pool grew to 3
    assert seen["default"][:2] == (2, 2)  # the pool's own count
    assert kernels.get_num_threads() == 2  # this thread never asked for anything else
    for _, _, y in seen.values():
        np.testing.assert_array_equal(y, want)
    with pytest.raises(ValueError):
        kernels.use_threads(-1)


# ------------------------------------------------------------------------------ exp / activations
def test_exp_accuracy(rng):
    n = 20000 if SMALL else 200000
    x = np.concatenate([rng.uniform(-87.0, 88.7, n), rng.uniform(-1, 1, n // 4),
                        [0.0, -0.0, 1e-30, 88.7, -87.3]]).astype(np.float32)
    y = kernels._exp(x)
    assert relerr(y, np.exp(x.astype(np.float64))) <= 5e-7


def test_exp_specials():
    x = np.array([np.nan, np.inf, -np.inf, 100.0, -200.0, 89.0], np.float32)
    with np.errstate(all="ignore"):
        y = kernels._exp(x)
    assert np.isnan(y[0]) and y[1] == np.inf and y[2] == 0.0 and y[3] == np.inf and y[4] == 0.0
    assert y[5] == np.inf


def _silu64(g):
    return g / (1.0 + np.exp(-g))


def _gelu64(x):
    # 0.5x(1+tanh(z)) == x * sigmoid(2z); the sigmoid form avoids 1+tanh(z) cancelling to 0 in float64
    z = np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)
    return x / (1.0 + np.exp(-2.0 * z))


@pytest.mark.parametrize("shape", [(1,), (7,), (3, 33), (2, 5, 129)])
def test_swiglu(rng, shape):
    g = (rng.standard_normal(shape) * 6).astype(np.float32)
    u = rng.standard_normal(shape).astype(np.float32)
    y = kernels.swiglu(g, u)
    ref = _silu64(g.astype(np.float64)) * u
    assert y.shape == shape and y.dtype == np.float32
    assert relerr(y, ref) <= 5e-7


def test_silu_range(rng):
    n = 20000 if SMALL else 200000
    g = rng.uniform(-80, 80, n).astype(np.float32)
    u = np.ones(n, np.float32)
    assert relerr(kernels.swiglu(g, u), _silu64(g.astype(np.float64))) <= 5e-7


def test_gelu_geglu(rng):
    n = 20000 if SMALL else 200000
    x = np.concatenate([rng.uniform(-10, 10, n), rng.standard_normal(n), [0.0, -0.0, 1e-20]])
    x = x.astype(np.float32)
    x64 = x.astype(np.float64)
    z2 = np.abs(2.0 * np.sqrt(2.0 / np.pi) * (x64 + 0.044715 * x64 ** 3))
    tol = 4 * U * (1.0 + z2)            # gelu is ill-conditioned for x << 0 (d ln f / d ln x ~ 2z)
    ref = _gelu64(x64)
    y = kernels.gelu(x)
    assert np.all(np.abs(y - ref) <= tol * np.abs(ref) + 1e-38)
    small = np.abs(x) <= 3
    assert np.max(np.abs(y - ref)[small] / (np.abs(ref[small]) + 1e-38)) <= 2e-6
    u = rng.standard_normal(x.shape).astype(np.float32)
    yg = kernels.geglu(x, u)
    refg = ref * u
    assert np.all(np.abs(yg - refg) <= tol * np.abs(refg) + 1e-38)


def test_elementwise_inplace(rng):
    g = rng.standard_normal(1000).astype(np.float32)
    u = rng.standard_normal(1000).astype(np.float32)
    ref = kernels.swiglu(g, u)
    g2 = g.copy()
    assert kernels.swiglu(g2, u, out=g2) is g2
    np.testing.assert_array_equal(g2, ref)
    x = g.copy()
    kernels.gelu(x, out=x)
    np.testing.assert_array_equal(x, kernels.gelu(g))


# ------------------------------------------------------------------------------ softmax / rmsnorm
def _softmax64(x):
    x = x.astype(np.float64)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@pytest.mark.parametrize("shape", [(1,), (17,), (1, 1), (3, 17), (5, 4099), (2, 32768)])
def test_softmax(rng, shape):
    x = (rng.standard_normal(shape) * 8).astype(np.float32)
    y = kernels.softmax(x)
    assert relerr(y, _softmax64(x)) <= 1e-6


def test_softmax_vocab_row(rng):
    C = 32768 if SMALL else 262144
    x = (rng.standard_normal((1, C)) * 5 + 3).astype(np.float32)
    assert relerr(kernels.softmax(x), _softmax64(x)) <= 1e-6


def test_softmax_masked_and_inplace(rng):
    x = (rng.standard_normal((4, 100)) * 10).astype(np.float32)
    x[:, 50:] = -np.inf
    ref = _softmax64(x)
    y = x.copy()
    assert kernels.softmax(y, out=y) is y
    assert np.all(y[:, 50:] == 0)
    assert relerr(y[:, :50], ref[:, :50]) <= 1e-6


def _rms64(x, w, eps):
    x = x.astype(np.float64)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


@pytest.mark.parametrize("shape", [(1,), (640,), (1, 1), (3, 17), (5, 640), (2, 8192)])
def test_rmsnorm(rng, shape):
    x = (rng.standard_normal(shape) * 3).astype(np.float32)
    w = rng.standard_normal(shape[-1]).astype(np.float32)
    y = kernels.rmsnorm(x, w, 1e-6)
    assert relerr(y, _rms64(x, w, 1e-6)) <= 1e-5
    y2 = x.copy()
    kernels.rmsnorm(y2, w, 1e-6, out=y2)
    np.testing.assert_array_equal(y2, y)


# ------------------------------------------------------------------------------ rope
def _rope64(x, pos, base, mode, rot, fs):
    T, H, D = x.shape
    y = x.astype(np.float64).copy()
    half = rot // 2
    inv = base ** (-2.0 * np.arange(half) / rot)
    th = (pos.astype(np.float64) * fs)[:, None] * inv[None, :]
    c, s = np.cos(th)[:, None, :], np.sin(th)[:, None, :]
    if mode == "neox":
        i0, i1 = np.arange(half), np.arange(half) + half
    else:
        i0, i1 = 2 * np.arange(half), 2 * np.arange(half) + 1
    x0, x1 = y[:, :, i0].copy(), y[:, :, i1].copy()
    y[:, :, i0] = x0 * c - x1 * s
    y[:, :, i1] = x0 * s + x1 * c
    return y


@pytest.mark.parametrize("mode", ["normal", "neox"])
@pytest.mark.parametrize("T,H,D,rot,fs", [(1, 1, 2, None, 1.0), (5, 4, 64, None, 1.0),
                                          (3, 2, 256, 128, 0.25), (7, 3, 80, 34, 1.0)])
def test_rope(rng, mode, T, H, D, rot, fs):
    x = rng.standard_normal((T, H, D)).astype(np.float32)
    pos = rng.integers(0, 40000, T).astype(np.int32)
    y = kernels.rope(x, pos, 10000.0, mode=mode, rot_dim=rot, freq_scale=fs)
    ref = _rope64(x, pos, 10000.0, mode, rot or D, fs)
    assert np.max(np.abs(y - ref)) <= 4 * U * np.max(np.abs(x)) * 2
    y2 = x.copy()
    kernels.rope(y2, pos, 10000.0, mode=mode, rot_dim=rot, freq_scale=fs, out=y2)
    np.testing.assert_array_equal(y2, y)


# ------------------------------------------------------------------------------ matmul
MM_SHAPES = [(1, 1, 1), (1, 7, 1), (2, 3, 5), (1, 2048, 640), (3, 37, 33), (4, 5, 100), (5, 19, 17),
             (7, 100, 65), (13, 33, 300), (64, 96, 128), (97, 131, 257)]
if not SMALL:
    MM_SHAPES += [(128, 2048, 640), (300, 200, 1000)]


def _mm_check(x, w, y):
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    ref = x64 @ w64.T if x.ndim == 2 else w64 @ x64
    bound = 2 * np.sqrt(x.shape[-1]) * U * (np.abs(x64) @ np.abs(w64).T if x.ndim == 2
                                           else np.abs(w64) @ np.abs(x64)) + 1e-30
    err = np.abs(y - ref)
    assert np.all(err <= bound), f"max err/bound = {np.max(err / bound):.3f}"


@pytest.mark.parametrize("M,N,K", MM_SHAPES)
def test_matmul(rng, M, N, K):
    x = rng.standard_normal((M, K)).astype(np.float32)
    w = rng.standard_normal((N, K)).astype(np.float32)
    y = kernels.matmul(x, w)
    assert y.shape == (M, N) and y.dtype == np.float32
    _mm_check(x, w, y)


def test_matmul_1d_and_large_k(rng):
    K = 8192
    x = rng.standard_normal(K).astype(np.float32)
    w = rng.standard_normal((67, K)).astype(np.float32)
    y = kernels.matmul(x, w)
    assert y.shape == (67,)
    _mm_check(x, w, y)
    x2 = rng.standard_normal((9, K)).astype(np.float32)
    _mm_check(x2, w, kernels.matmul(x2, w))


def test_matmul_out(rng):
    x = rng.standard_normal((6, 40)).astype(np.float32)
    w = rng.standard_normal((30, 40)).astype(np.float32)
    out = np.empty((6, 30), np.float32)
    assert kernels.matmul(x, w, out=out) is out
    _mm_check(x, w, out)


def test_threads_agree(rng, threads):
    shapes = [(1, 1000, 256), (3, 257, 129), (40, 300, 200)]
    data = [(rng.standard_normal((M, K)).astype(np.float32),
             rng.standard_normal((N, K)).astype(np.float32)) for M, N, K in shapes]
    kernels.set_num_threads(1)
    r1 = [kernels.matmul(x, w) for x, w in data]
    q = rng.standard_normal((1, 4, 64)).astype(np.float32)
    k = rng.standard_normal((600, 1, 64)).astype(np.float32)
    v = rng.standard_normal((600, 1, 64)).astype(np.float32)
    a1 = kernels.attention(q, k, v, n_past=599, scale=0.125)
    kernels.set_num_threads(2)
    for (x, w), y1 in zip(data, r1):
        np.testing.assert_array_equal(kernels.matmul(x, w), y1)   # deterministic across splits
    a2 = kernels.attention(q, k, v, n_past=599, scale=0.125)       # split-KV path with 2 threads
    assert np.max(np.abs(a2 - a1)) <= 1e-6 * np.max(np.abs(a1))


# ------------------------------------------------------------------------------ FP8
def _wide_values(rng, n):
    mag = np.exp2(rng.uniform(-14, 10, n))          # spans subnormal e4m3 .. saturation
    return (mag * rng.choice([-1.0, 1.0], n)).astype(np.float32)


def _specials():
    sub = [k * 2.0 ** -9 for k in range(9)] + [(k + 0.5) * 2.0 ** -9 for k in range(8)]
    return np.array([0.0, -0.0, 448.0, -448.0, 449.0, 464.0, 463.99, 464.01, 480.0, 1e6, -1e6,
                     np.inf, -np.inf, np.nan, -np.nan, 2.0 ** -6, 2.0 ** -7, 2.0 ** -10, 2.0 ** -11,
                     2.0 ** -12, 1e-30, 1e-45, -1e-45, 240.0, 248.0, 256.0, 272.0, 1.0625, 1.1875,
                     3.0 * 2.0 ** -10] + sub + [-s for s in sub], np.float32)


def test_fp8_encode_specials():
    x = _specials()
    q = kernels.fp8_encode(x, 1.0)
    np.testing.assert_array_equal(q, fp8_ref_encode(x))
    assert q[2] == 0x7E and q[4] == 0x7E and q[5] == 0x7E and q[11] == 0x7E and q[12] == 0xFE
    assert q[13] == 0x7F and q[14] == 0xFF and q[0] == 0x00 and q[1] == 0x80
    if HAVE_ML_DTYPES:
        import ml_dtypes
        mq = np.clip(x, -448, 448).astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
        np.testing.assert_array_equal(q, mq)


def test_fp8_encode_sweep(rng):
    n = 100_000 if SMALL else 1_000_000       # 10^5 under qemu (time), 10^6 on the host
    x = _wide_values(rng, n)
    scale = 0.37
    q = kernels.fp8_encode(x, scale)
    v = np.clip(x / np.float32(scale), -448, 448)
    np.testing.assert_array_equal(q, fp8_ref_encode(v))
    if HAVE_ML_DTYPES:
        import ml_dtypes
        np.testing.assert_array_equal(q, v.astype(ml_dtypes.float8_e4m3fn).view(np.uint8))
    # every float32 bit pattern near the e4m3 range boundaries, round-trip ties
    t = np.arange(0x3A000000, 0x44000000, 997 if SMALL else 97, dtype=np.uint32).view(np.float32)
    np.testing.assert_array_equal(kernels.fp8_encode(t, 1.0), fp8_ref_encode(t))


def test_fp8_row_scales(rng):
    x = _wide_values(rng, 6 * 7 * 33).reshape(6, 7, 33)
    s = np.exp2(rng.uniform(-4, 4, (6, 7))).astype(np.float32)
    q = kernels.fp8_encode(x, s)
    np.testing.assert_array_equal(q, fp8_ref_encode(np.clip(x / s[..., None], -448, 448)))
    d = kernels.fp8_decode(q, s)
    np.testing.assert_array_equal(d, fp8_ref_table()[q] * s[..., None])


def test_fp8_decode_all_codes():
    q = np.arange(256, dtype=np.uint8)
    d = kernels.fp8_decode(q, 1.0)
    ref = fp8_ref_table()
    np.testing.assert_array_equal(d, ref)       # NaN == NaN for assert_array_equal
    if HAVE_ML_DTYPES:
        import ml_dtypes
        np.testing.assert_array_equal(d, q.view(ml_dtypes.float8_e4m3fn).astype(np.float32))
    d2 = kernels.fp8_decode(np.tile(q, (3, 1)), np.array([1.0, 0.5, 3.0], np.float32))
    np.testing.assert_array_equal(d2, ref[None, :] * np.array([1.0, 0.5, 3.0], np.float32)[:, None])


def test_fp8_quantize_rows(rng):
    x = (rng.standard_normal((5, 3, 64)) * np.exp2(rng.uniform(-8, 8, (5, 3, 1)))).astype(np.float32)
    x[1, 2] = 0.0
    q, s = kernels.fp8_quantize_rows(x)
    assert q.shape == x.shape and q.dtype == np.uint8 and s.shape == (5, 3) and s.dtype == np.float32
    ref_s = np.max(np.abs(x), axis=-1) / np.float32(448.0)
    ref_s[1, 2] = 1.0
    np.testing.assert_array_equal(s, ref_s)
    np.testing.assert_array_equal(q, fp8_ref_encode(np.clip(x / s[..., None], -448, 448)))
    assert np.all(q[1, 2] == 0)


# ------------------------------------------------------------------------------ attention
ATT_CASES = [
    # T, Hq, Hkv, D, n_past, S, window
    (1, 1, 1, 1, 0, 1, 0),
    (1, 4, 1, 64, 0, 8, 0),
    (1, 4, 1, 64, 200, 256, 0),          # decode
    (1, 8, 2, 64, 100, 130, 16),         # decode, sliding window
    (7, 4, 4, 32, 0, 7, 0),              # prefill, MHA
    (9, 6, 2, 80, 5, 20, 0),             # prefill with n_past, GQA
    (20, 4, 1, 256, 3, 40, 6),           # prefill, SWA, D=256
    (70, 2, 1, 16, 70, 150, 0),          # > one KV tile
]


@pytest.mark.parametrize("T,Hq,Hkv,D,n_past,S,window", ATT_CASES)
def test_attention_fp32(rng, T, Hq, Hkv, D, n_past, S, window):
    q = rng.standard_normal((T, Hq, D)).astype(np.float32)
    k = rng.standard_normal((S, Hkv, D)).astype(np.float32)
    v = rng.standard_normal((S, Hkv, D)).astype(np.float32)
    k[n_past + T:] = np.nan                                     # unread capacity rows
    scale = 1.0 / np.sqrt(D)
    y = kernels.attention(q, k, v, n_past=n_past, scale=scale, window=window)
    ref = ref_attention(q, k, v, n_past, scale, window)
    assert y.shape == (T, Hq, D)
    assert np.max(np.abs(y - ref)) <= 1e-5 * np.max(np.abs(ref))


@pytest.mark.parametrize("T,Hq,Hkv,D,n_past,S,window", ATT_CASES)
def test_attention_fp8(rng, T, Hq, Hkv, D, n_past, S, window):
    q = rng.standard_normal((T, Hq, D)).astype(np.float32)
    kf = (rng.standard_normal((S, Hkv, D)) * 3).astype(np.float32)
    vf = rng.standard_normal((S, Hkv, D)).astype(np.float32)
    k8, ks = kernels.fp8_quantize_rows(kf)
    v8, vs = kernels.fp8_quantize_rows(vf)
    scale = 1.0 / np.sqrt(D)
    y = kernels.attention(q, k8, v8, n_past=n_past, scale=scale, window=window, k_scale=ks, v_scale=vs)
    kd = kernels.fp8_decode(k8, ks)
    vd = kernels.fp8_decode(v8, vs)
    ref = ref_attention(q, kd, vd, n_past, scale, window)
    assert np.max(np.abs(y - ref)) <= 1e-5 * np.max(np.abs(ref))


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("T,n_past,window,ring", [
    (1, 300, 16, 16),       # decode, the smallest ring
    (1, 250, 64, 80),       # decode, ring wrapped several times
    (12, 90, 20, 31),       # prefill chunk, ring = window + T - 1
    (12, 5, 20, 40),        # early: nothing evicted yet
    (70, 200, 64, 140),     # > one KV tile
])
def test_attention_ring_equals_full_cache(rng, threads, fp8, T, n_past, window, ring):
    """A sliding-window layer may keep only a ring of rows: key position j in row j % ring. The
    result is bit-for-bit the full cache's (same keys, same order); evicted rows are never read."""
    kernels.set_num_threads(2)
    Hq, Hkv, D, S = 4, 2, 32, n_past + T
    q = rng.standard_normal((T, Hq, D)).astype(np.float32)
    k = (rng.standard_normal((S, Hkv, D)) * 3).astype(np.float32)
    v = rng.standard_normal((S, Hkv, D)).astype(np.float32)
    kw, kr = {}, {}
    if fp8:
        (k, ks), (v, vs) = kernels.fp8_quantize_rows(k), kernels.fp8_quantize_rows(v)
    pos = np.arange(max(0, S - ring), S)
    k_ring = np.full((ring,) + k.shape[1:], 255 if fp8 else np.nan, k.dtype)  # evicted: poison
    v_ring = k_ring.copy()
    k_ring[pos % ring], v_ring[pos % ring] = k[pos], v[pos]
    if fp8:
        kw = {"k_scale": ks, "v_scale": vs}
        ksr, vsr = np.full((ring, Hkv), np.nan, np.float32), np.full((ring, Hkv), np.nan, np.float32)
        ksr[pos % ring], vsr[pos % ring] = ks[pos], vs[pos]
        kr = {"k_scale": ksr, "v_scale": vsr}
    full = kernels.attention(q, k, v, n_past=n_past, scale=0.2, window=window, **kw)
    y = kernels.attention(q, k_ring, v_ring, n_past=n_past, scale=0.2, window=window, ring=ring, **kr)
    np.testing.assert_array_equal(y, full)


def test_attention_ring_rejects_too_small_rings(rng):
    q = rng.standard_normal((8, 2, 16)).astype(np.float32)
    kv = rng.standard_normal((20, 1, 16)).astype(np.float32)
    with pytest.raises(ValueError, match="ring"):
        kernels.attention(q, kv, kv, n_past=40, scale=0.2, window=16, ring=20)  # needs >= 23
    with pytest.raises(ValueError, match="ring"):
        kernels.attention(q, kv, kv, n_past=40, scale=0.2, ring=20)  # no window


def test_attention_long_threads(rng, threads):
    n = 300 if SMALL else 3000
    q = rng.standard_normal((1, 4, 64)).astype(np.float32)
    k = rng.standard_normal((n, 1, 64)).astype(np.float32)
    v = rng.standard_normal((n, 1, 64)).astype(np.float32)
    ref = ref_attention(q, k, v, n - 1, 0.125)
    for nt in (1, 2):
        kernels.set_num_threads(nt)
        y = kernels.attention(q, k, v, n_past=n - 1, scale=0.125)
        assert np.max(np.abs(y - ref)) <= 1e-5 * np.max(np.abs(ref))


# ------------------------------------------------------------------------------ argument checks
def test_errors_matmul(rng):
    x = rng.standard_normal((4, 8)).astype(np.float32)
    w = rng.standard_normal((6, 8)).astype(np.float32)
    with pytest.raises(ValueError, match="C-contiguous"):
        kernels.matmul(x[:, ::2], w[:, :4])
    with pytest.raises(ValueError, match="C-contiguous"):
        kernels.matmul(x, np.asfortranarray(w))
    with pytest.raises(TypeError, match="x: expected dtype float32, got float64"):
        kernels.matmul(x.astype(np.float64), w)
    with pytest.raises(TypeError, match="numpy.ndarray"):
        kernels.matmul([[1.0]], w)
    with pytest.raises(ValueError, match="w: expected shape"):
        kernels.matmul(x, w[:, :7].copy())
    with pytest.raises(ValueError, match="out: expected shape"):
        kernels.matmul(x, w, out=np.empty((4, 5), np.float32))
    with pytest.raises(TypeError, match="out: expected dtype float32"):
        kernels.matmul(x, w, out=np.empty((4, 6), np.float64))
    with pytest.raises(ValueError, match="x: expected a 1-D or 2-D"):
        kernels.matmul(x.reshape(2, 2, 8), w)
    with pytest.raises(ValueError, match="C-contiguous"):
        kernels.matmul(x, w, out=np.empty((4, 12), np.float32)[:, ::2])
    with pytest.raises(ValueError, match="overlap"):
        xx = np.zeros((6, 6), np.float32)
        kernels.matmul(xx, np.zeros((6, 6), np.float32), out=xx)


def test_errors_other(rng):
    x = rng.standard_normal((4, 8)).astype(np.float32)
    with pytest.raises(ValueError, match="weight: expected shape"):
        kernels.rmsnorm(x, np.ones(7, np.float32), 1e-6)
    with pytest.raises(ValueError, match="u: expected shape"):
        kernels.swiglu(x, x[:2].copy())
    with pytest.raises(ValueError, match="C-contiguous"):
        kernels.softmax(x.T)
    with pytest.raises(TypeError, match="positions: expected dtype int32"):
        kernels.rope(x.reshape(1, 4, 8), np.zeros(1, np.int64), 10000.0)
    with pytest.raises(ValueError, match="mode"):
        kernels.rope(x.reshape(1, 4, 8), np.zeros(1, np.int32), 10000.0, mode="bogus")
    with pytest.raises(ValueError, match="rot_dim"):
        kernels.rope(x.reshape(1, 4, 8), np.zeros(1, np.int32), 10000.0, rot_dim=3)
    with pytest.raises(ValueError, match="scale: expected"):
        kernels.fp8_encode(x, np.ones(3, np.float32))
    with pytest.raises(TypeError, match="scale"):
        kernels.fp8_encode(x, np.ones(4, np.float64))
    with pytest.raises(TypeError, match="q: expected dtype uint8"):
        kernels.fp8_decode(x, 1.0)
    q = np.zeros((2, 2, 8), np.float32)
    k = np.zeros((4, 1, 8), np.float32)
    with pytest.raises(ValueError, match="cache has 4 rows"):
        kernels.attention(q, k, k, n_past=3, scale=1.0)
    with pytest.raises(ValueError, match="kv heads"):
        kernels.attention(np.zeros((1, 3, 8), np.float32), np.zeros((4, 2, 8), np.float32),
                          np.zeros((4, 2, 8), np.float32), n_past=0, scale=1.0)
    with pytest.raises(ValueError, match="k_scale"):
        kernels.attention(q, k.astype(np.uint8), k.astype(np.uint8), n_past=0, scale=1.0)
    with pytest.raises(TypeError, match="k: expected dtype"):
        kernels.attention(q, k.astype(np.float16), k.astype(np.float16), n_past=0, scale=1.0)
    with pytest.raises(ValueError, match="C-contiguous"):
        kernels.attention(q, k[::-1], k, n_past=0, scale=1.0)


# ------------------------------------------------------------------------------ portable build
@pytest.mark.skipif(os.environ.get("CAPIBARA6_IN_PORTABLE_TEST") == "1", reason="already the portable run")
@pytest.mark.skipif(IS_ARM, reason="scripts/test_arm.sh runs the aarch64 portable build itself")
def test_portable_build_passes_suite(tmp_path):
    """Build with CAPIBARA6_PORTABLE=1 (no -march flags: generic vector widths) and run this
    suite against it in a subprocess."""
    import shutil
    import subprocess
    import sys
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler")
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, CAPIBARA6_PORTABLE="1", CAPIBARA6_FORCE_PORTABLE="1",
               CAPIBARA6_IN_PORTABLE_TEST="1", PYTHONPATH=str(tmp_path), PYTHONDONTWRITEBYTECODE="1")
    subprocess.run([sys.executable, os.path.join(repo, "capibara6", "kernels", "build_ffi.py"), "--outdir",
                    str(tmp_path)], check=True, env=env, capture_output=True)
    code = ("import sys; from capibara6 import kernels; i = kernels.build_info(); "
            "assert kernels.__file__.startswith(sys.argv[1]), kernels.__file__; "
            "assert i['portable'] and not i['avx2'], i")
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, env=env, cwd=str(tmp_path))
    r = subprocess.run([sys.executable, "-m", "pytest", os.path.join(repo, "tests", "kernels"), "-q",
                        "-x", "-p", "no:cacheprovider", "--confcutdir", os.path.join(repo, "tests", "kernels"),
                        "--rootdir", str(tmp_path), "-c", os.devnull],
                       env=env, cwd=str(tmp_path), capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]


def test_concurrent_callers(rng, threads):
    """Several Python threads (the server runs several models in one process) calling kernels at
    once: the GIL is released, the pool runs one job at a time and other callers run inline."""
    import threading
    kernels.set_num_threads(2)
    x = rng.standard_normal((33, 300)).astype(np.float32)
    w = rng.standard_normal((257, 300)).astype(np.float32)
    q = rng.standard_normal((3, 4, 64)).astype(np.float32)
    k = rng.standard_normal((400, 2, 64)).astype(np.float32)
    ref_mm = kernels.matmul(x, w)
    ref_at = kernels.attention(q, k, k, n_past=397, scale=0.125)
    errors = []

    def work():
        try:
            for _ in range(5 if SMALL else 20):
                np.testing.assert_array_equal(kernels.matmul(x, w), ref_mm)
                a = kernels.attention(q, k, k, n_past=397, scale=0.125)
                assert np.max(np.abs(a - ref_at)) <= 1e-6 * np.max(np.abs(ref_at))
        except Exception as e:  # pragma: no cover
            errors.append(e)

    ts = [threading.Thread(target=work) for _ in range(3)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, errors


def test_empty_arrays():
    z = np.zeros((0, 8), np.float32)
    assert kernels.matmul(z, np.ones((3, 8), np.float32)).shape == (0, 3)
    np.testing.assert_array_equal(kernels.matmul(np.ones((2, 0), np.float32), np.ones((3, 0), np.float32)),
                                  np.zeros((2, 3), np.float32))
    assert kernels.softmax(z).shape == (0, 8)
    assert kernels.rmsnorm(z, np.ones(8, np.float32), 1e-6).shape == (0, 8)
    assert kernels.fp8_quantize_rows(z)[1].shape == (0,)
    q0 = np.zeros((0, 2, 8), np.float32)
    kv = np.zeros((4, 1, 8), np.float32)
    assert kernels.attention(q0, kv, kv, n_past=0, scale=1.0).shape == (0, 2, 8)


def test_idle_workers_sleep(rng, threads):
    """Idle pool workers must sleep (condvar), not spin: ~no CPU used while idle."""
    import time
    kernels.set_num_threads(2)
    x = rng.standard_normal((64, 256)).astype(np.float32)
    w = rng.standard_normal((512, 256)).astype(np.float32)
    for _ in range(3):
        kernels.matmul(x, w)               # wake the workers up
    t0 = time.process_time()
    time.sleep(0.3)
    assert time.process_time() - t0 < 0.05


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc")
def test_thread_scratch_is_freed_when_the_thread_exits(rng):
    """The server runs each generation on a new thread: the per-thread scratch of GEMM packing,
    rope tables and attention must go with the thread, not pile up."""
    import threading
    x = rng.standard_normal((64, 1024)).astype(np.float32)
    w = rng.standard_normal((512, 1024)).astype(np.float32)
    q = rng.standard_normal((64, 4, 128)).astype(np.float32)
    pos = np.arange(64, dtype=np.int32)

    def work():
        kernels.matmul(x, w)
        kernels.rope(q, pos, 10000.0, mode="neox")
        kernels.attention(q, q[:, :1].copy(), q[:, :1].copy(), n_past=0, scale=0.1)

    def run_threads(n):
        for _ in range(n):
            t = threading.Thread(target=work)
            t.start()
            t.join()

    run_threads(5)  # warm up the allocator
    before = _rss_bytes()
    n = 10 if SMALL else 60
    run_threads(n)
    grown = _rss_bytes() - before
    print(f"RSS growth over {n} threads: {grown / 2**20:.1f} MiB")
    assert grown < 8 * 2**20  # 0.34 MiB per thread (20 MiB here) when it leaked
