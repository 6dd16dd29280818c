"""Numpy reference for the GGUF block formats and llama.cpp's activation quantization.

Written from the ggml format definitions (block_q4_0 ... block_q6_K), independently of
capibara6/kernels/src/quant.c, and needing only numpy (it runs in the aarch64 lane too).
"""
import numpy as np

Q4_0, Q5_0, Q8_0, Q4_K, Q5_K, Q6_K = 2, 6, 8, 12, 13, 14
BLOCK = {Q4_0: (32, 18), Q5_0: (32, 22), Q8_0: (32, 34), Q4_K: (256, 144), Q5_K: (256, 176), Q6_K: (256, 210)}
K_QUANTS = (Q4_K, Q5_K, Q6_K)


def _f16(b, off):
    return b[:, off:off + 2].copy().view(np.float16).astype(np.float32)  # [n, 1]


def _nibbles(qs):
    """[n, m] bytes -> ([n, m] low, [n, m] high) nibbles as int32."""
    return (qs & 0xF).astype(np.int32), (qs >> 4).astype(np.int32)


def _k_scales(sc):
    """12 packed bytes -> (scales, mins) [n, 8] (6 bits each)."""
    sc = sc.astype(np.int32)
    d = np.empty((sc.shape[0], 8), np.int32)
    m = np.empty_like(d)
    d[:, :4], m[:, :4] = sc[:, 0:4] & 63, sc[:, 4:8] & 63
    d[:, 4:] = (sc[:, 8:12] & 0xF) | ((sc[:, 0:4] >> 6) << 4)
    m[:, 4:] = (sc[:, 8:12] >> 4) | ((sc[:, 4:8] >> 6) << 4)
    return d, m


def dequant(raw, t):
    """uint8 [R, row_bytes] -> float32 [R, K]."""
    nbytes = BLOCK[t][1]
    rows = raw.shape[0]
    b = raw.reshape(-1, nbytes)
    if t == Q8_0:
        v = _f16(b, 0) * b[:, 2:].view(np.int8).astype(np.float32)
    elif t == Q4_0:
        lo, hi = _nibbles(b[:, 2:])
        v = _f16(b, 0) * (np.concatenate([lo, hi], 1) - 8).astype(np.float32)
    elif t == Q5_0:
        qh = b[:, 2:6].copy().view("<u4").astype(np.int64)  # [n, 1]
        bits = (qh >> np.arange(32)) & 1
        lo, hi = _nibbles(b[:, 6:])
        q = np.concatenate([lo, hi], 1) | (bits << 4)
        v = _f16(b, 0) * (q - 16).astype(np.float32)
    elif t in (Q4_K, Q5_K):
        d, dmin = _f16(b, 0), _f16(b, 2)
        sc, mn = _k_scales(b[:, 4:16])
        qs = b[:, 48:] if t == Q5_K else b[:, 16:]
        q = np.empty((b.shape[0], 256), np.int32)
        for c in range(4):
            lo, hi = _nibbles(qs[:, 32 * c:32 * c + 32])
            if t == Q5_K:
                qh = b[:, 16:48].astype(np.int32)
                lo = lo | (((qh >> (2 * c)) & 1) << 4)
                hi = hi | (((qh >> (2 * c + 1)) & 1) << 4)
            q[:, 64 * c:64 * c + 32], q[:, 64 * c + 32:64 * c + 64] = lo, hi
        sub = np.repeat(np.arange(8), 32)
        v = d * sc[:, sub] * q - dmin * mn[:, sub]
    elif t == Q6_K:
        ql, qh = b[:, :128].astype(np.int32), b[:, 128:192].astype(np.int32)
        sc = b[:, 192:208].view(np.int8).astype(np.float32)
        d = _f16(b, 208)
        q = np.empty((b.shape[0], 256), np.int32)
        for n in range(2):
            l0, h0 = ql[:, 64 * n:64 * n + 64], qh[:, 32 * n:32 * n + 32]
            o = 128 * n
            q[:, o:o + 32] = (l0[:, :32] & 0xF) | ((h0 & 3) << 4)
            q[:, o + 32:o + 64] = (l0[:, 32:] & 0xF) | (((h0 >> 2) & 3) << 4)
            q[:, o + 64:o + 96] = (l0[:, :32] >> 4) | (((h0 >> 4) & 3) << 4)
            q[:, o + 96:o + 128] = (l0[:, 32:] >> 4) | (((h0 >> 6) & 3) << 4)
        v = d * sc[:, np.arange(256) // 16] * (q - 32)
    else:
        raise ValueError(t)
    return v.astype(np.float32).reshape(rows, -1)


def f16_round(x):
    return np.asarray(x, np.float32).astype(np.float16).astype(np.float32)


def quant_act(x, t):
    """x [M, K] as llama.cpp quantizes it for weight type t, dequantized back to float32."""
    if t in K_QUANTS:  # Q8_K: per 256, the first largest |x| maps to -127, scale 1/iscale
        b = x.reshape(-1, 256).astype(np.float32)
        mx = b[np.arange(b.shape[0]), np.abs(b).argmax(axis=1)][:, None]
        iscale = np.where(mx != 0, np.float32(-127.0) / np.where(mx != 0, mx, 1), 0).astype(np.float32)
        d = np.where(iscale != 0, 1 / np.where(iscale != 0, iscale, 1), 0).astype(np.float32)
        return (np.minimum(127, np.rint(iscale * b)) * d).reshape(x.shape).astype(np.float32)
    b = x.reshape(-1, 32).astype(np.float32)  # Q8_0: per 32, fp16 scale amax/127
    amax = np.abs(b).max(axis=1, keepdims=True)
    inv = np.where(amax > 0, np.float32(127.0) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    return (np.rint(b * inv) * f16_round(amax / np.float32(127.0))).reshape(x.shape).astype(np.float32)


def quant_act16(x):
    """16-bit activations (kernels' act_bits=16): per 32, q = rint(x * 32767/amax), scale amax/32767."""
    b = x.reshape(-1, 32).astype(np.float32)
    amax = np.abs(b).max(axis=1, keepdims=True)
    inv = np.where(amax > 0, np.float32(32767.0) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    return (np.clip(np.rint(b * inv), -32767, 32767) * (amax / np.float32(32767.0))).reshape(x.shape).astype(np.float32)


def qmatmul(x, raw, t, act_bits=8):
    xq = quant_act(x, t) if act_bits == 8 else quant_act16(x)
    return (xq.astype(np.float64) @ dequant(raw, t).astype(np.float64).T).astype(np.float32)


def random_blocks(rng, t, n, k):
    """Random bytes in every field (so every bit pattern is exercised), with sane fp16 scales."""
    qk, nbytes = BLOCK[t]
    raw = rng.integers(0, 256, size=(n, k // qk, nbytes), dtype=np.uint8)
    offs = [208] if t == Q6_K else ([0, 2] if t in (Q4_K, Q5_K) else [0])
    for off in offs:
        s = (rng.random((n, k // qk)) * 0.01 + 0.001).astype(np.float16)
        raw[:, :, off:off + 2] = s.view(np.uint8).reshape(n, k // qk, 2)
    return raw.reshape(n, -1)
