"""The kernels the engine calls agree with the numpy reference (capibara6/engine/ops_numpy.py) on the
shapes and options the graphs use: GQA, sliding window, FP8 caches, both rope modes."""

from __future__ import annotations

import numpy as np
import pytest

from capibara6.engine import ops_numpy as ref

from .conftest import kernels_available

pytestmark = pytest.mark.skipif(not kernels_available(), reason="kernels not built")


@pytest.fixture(scope="module")
def k():  # type: ignore[no-untyped-def]
    from capibara6 import kernels

    kernels.set_num_threads(1)
    return kernels


@pytest.mark.parametrize("window", [0, 16])
@pytest.mark.parametrize("fp8", [False, True])
def test_attention(k, window: int, fp8: bool) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(0)
    t, n_past, hq, hkv, d = 7, 90, 8, 2, 64
    q = rng.standard_normal((t, hq, d)).astype(np.float32)
    kc = rng.standard_normal((n_past + t + 5, hkv, d)).astype(np.float32) * 2
    vc = rng.standard_normal((n_past + t + 5, hkv, d)).astype(np.float32)
    kw: dict[str, np.ndarray] = {}
    if fp8:
        (kc, ks), (vc, vs) = ref.fp8_quantize_rows(kc), ref.fp8_quantize_rows(vc)
        kw = {"k_scale": ks, "v_scale": vs}
    a = k.attention(q, kc, vc, n_past=n_past, scale=0.125, window=window, **kw)
    b = ref.attention(q, kc, vc, n_past=n_past, scale=0.125, window=window, **kw)
    np.testing.assert_allclose(a, b, atol=2e-5)


@pytest.mark.parametrize("mode", ["normal", "neox"])
def test_rope(k, mode: str) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 3, 64)).astype(np.float32)
    pos = np.array([0, 1, 17, 511, 4000], np.int32)
    a = k.rope(x.copy(), pos, 1e6, mode=mode, rot_dim=64, freq_scale=0.5)
    b = ref.rope(x, pos, 1e6, mode=mode, rot_dim=64, freq_scale=0.5)
    np.testing.assert_allclose(a, b, atol=2e-4)


def test_norm_and_glu(k) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((6, 640)) * 50).astype(np.float32)
    w = rng.standard_normal(640).astype(np.float32)
    np.testing.assert_allclose(k.rmsnorm(x, w, 1e-6), ref.rmsnorm(x, w, 1e-6), rtol=1e-5, atol=1e-5)
    g, u = rng.standard_normal((2, 6, 128)).astype(np.float32)
    np.testing.assert_allclose(k.geglu(g, u), ref.geglu(g, u), atol=1e-5)
    np.testing.assert_allclose(k.swiglu(g, u), ref.swiglu(g, u), atol=1e-5)
    w2 = rng.standard_normal((96, 640)).astype(np.float32)
    np.testing.assert_allclose(k.matmul(x, w2), ref.matmul(x, w2), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("fp8", [False, True])
def test_attention_ring(k, fp8: bool) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(3)
    t, n_past, hq, hkv, d, window, ring = 5, 60, 4, 2, 32, 16, 20
    q = rng.standard_normal((t, hq, d)).astype(np.float32)
    kc = rng.standard_normal((ring, hkv, d)).astype(np.float32) * 2
    vc = rng.standard_normal((ring, hkv, d)).astype(np.float32)
    kw: dict[str, np.ndarray] = {}
    if fp8:
        (kc, ks), (vc, vs) = ref.fp8_quantize_rows(kc), ref.fp8_quantize_rows(vc)
        kw = {"k_scale": ks, "v_scale": vs}
    a = k.attention(q, kc, vc, n_past=n_past, scale=0.125, window=window, ring=ring, **kw)
    b = ref.attention(q, kc, vc, n_past=n_past, scale=0.125, window=window, ring=ring, **kw)
    np.testing.assert_allclose(a, b, atol=2e-5)
