"""An ops wrapper that reproduces llama.cpp's CPU numerics on top of our kernels, for tests only.

llama.cpp does not compute in fp32: before a dot product with a quantized weight it quantizes the
activations (Q8_0 blocks of 32 for Q4_0/Q5_0/Q8_0 weights, Q8_K blocks of 256 for k-quants), its
default KV cache is fp16 (and q and the softmax weights are rounded to fp16 to multiply with it),
and GELU comes from an fp16 table. On Gemma 3 270M those roundings alone move the logits about
as much as our fp32 engine differs from llama.cpp (llama.cpp with an F32 KV cache agrees with
llama.cpp with F16 at only ~88% top-1). Running our graph with these roundings emulated shows
that the remaining disagreement is numerics, not the graph.
"""

from __future__ import annotations

from types import ModuleType

import numpy as np

from server.engine.gguf_loader import GGUFModel

_Q8_K_TYPES = {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}
_Q8_0_TYPES = {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"}


def f16(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, np.float32).astype(np.float16).astype(np.float32)


def q8_0(x: np.ndarray) -> np.ndarray:
    """ggml quantize_row_q8_0 (x86 path) then dequantize: int8 per 32, fp16 scale amax/127."""
    shp = x.shape
    b = x.reshape(-1, 32).astype(np.float32)
    amax = np.abs(b).max(axis=1, keepdims=True)
    d = amax / np.float32(127.0)
    inv = np.where(amax > 0, np.float32(127.0) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    q = np.rint(b * inv)
    return (q * f16(d)).reshape(shp).astype(np.float32)


def q8_k(x: np.ndarray) -> np.ndarray:
    """ggml quantize_row_q8_K_ref then dequantize: int8 per 256, float scale max/-127."""
    shp = x.shape
    b = x.reshape(-1, 256).astype(np.float32)
    idx = np.abs(b).argmax(axis=1)
    mx = b[np.arange(b.shape[0]), idx][:, None]
    iscale = np.where(mx != 0, np.float32(-127.0) / np.where(mx != 0, mx, 1), 0).astype(np.float32)
    q = np.minimum(127, np.rint(iscale * b))
    d = np.where(iscale != 0, 1 / np.where(iscale != 0, iscale, 1), 0).astype(np.float32)
    return (q * d).reshape(shp).astype(np.float32)


class LlamaCppNumerics:
    """Same API as `kernels` (delegates to `base`) with llama.cpp's roundings added."""

    def __init__(self, base: ModuleType, model: GGUFModel) -> None:
        self._base = base
        self._types = {id(arr): model.file_types.get(name, "F32") for name, arr in model.tensors.items()}

    def __getattr__(self, name: str) -> object:
        return getattr(self._base, name)

    def matmul(self, x: np.ndarray, w: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        t = self._types.get(id(w), "F32")
        if t in _Q8_K_TYPES and x.shape[-1] % 256 == 0:
            x = q8_k(x)
        elif t in _Q8_0_TYPES and x.shape[-1] % 32 == 0:
            x = q8_0(x)
        elif t == "F16":
            x = f16(x)
        return self._base.matmul(np.ascontiguousarray(x), w, out=out)

    def geglu(self, g: np.ndarray, u: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        gel = f16(self._base.gelu(f16(g)))
        gel = np.where(g <= -10, 0, np.where(g >= 10, g, gel)).astype(np.float32)
        res = gel * u
        if out is not None:
            out[...] = res
            return out
        return res

    def attention(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, *, n_past: int, scale: float,
                  window: int = 0, out: np.ndarray | None = None, **_: object) -> np.ndarray:
        """Non-flash path with an F16 cache: q and the softmax weights rounded to fp16."""
        t, hq, _d = q.shape
        s = n_past + t
        kk, vv = f16(k[:s]), f16(v[:s])
        group = hq // kk.shape[1]
        qq = f16(q * np.float32(scale))
        res = np.empty((t, hq, vv.shape[2]), np.float32)
        pos = n_past + np.arange(t)[:, None]
        j = np.arange(s)[None, :]
        allowed = j <= pos
        if window > 0:
            allowed &= (pos - j) < window
        for h in range(hq):
            sc = qq[:, h, :] @ kk[:, h // group, :].T
            sc = np.where(allowed, sc, -np.inf)
            sc = np.exp(sc - sc.max(axis=1, keepdims=True))
            p = f16(sc / sc.sum(axis=1, keepdims=True))
            res[:, h, :] = p @ vv[:, h // group, :]
        if out is not None:
            out[...] = res
            return out
        return res


class LlamaCppGelu:
    """Only llama.cpp's GELU (fp16 table lookup, exact outside [-10, 10]); all else as `base`.
    For F32 models with an F32 KV cache this is the one rounding llama.cpp adds."""

    def __init__(self, base: ModuleType) -> None:
        self._base = base

    def __getattr__(self, name: str) -> object:
        return getattr(self._base, name)

    def geglu(self, g: np.ndarray, u: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        gel = f16(self._base.gelu(f16(g)))
        res = np.where(g <= -10, 0, np.where(g >= 10, g, gel)).astype(np.float32) * u
        if out is not None:
            out[...] = res
            return out
        return res
