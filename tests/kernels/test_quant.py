"""kernels.qmatmul / qdequant on GGUF block formats against the numpy reference (quant_ref.py)."""
import numpy as np
import pytest
import quant_ref as ref

from capibara6 import kernels

TYPES = [ref.Q4_0, ref.Q5_0, ref.Q8_0, ref.Q4_K, ref.Q5_K, ref.Q6_K]


@pytest.mark.parametrize("t", TYPES)
def test_dequant_matches_format_reference(rng, t):
    raw = ref.random_blocks(rng, t, 9, 512)
    np.testing.assert_array_equal(kernels.qdequant(raw, t), ref.dequant(raw, t))


@pytest.mark.parametrize("t", TYPES)
def test_reference_matches_gguf_package(rng, t):
    quants = pytest.importorskip("gguf.quants", reason="gguf is installed on x86 (dev), not in the aarch64 root")
    from gguf import GGMLQuantizationType
    raw = ref.random_blocks(rng, t, 5, 512)
    np.testing.assert_array_equal(ref.dequant(raw, t), quants.dequantize(raw, GGMLQuantizationType(t)))


@pytest.mark.parametrize("t", TYPES)
@pytest.mark.parametrize("m", [1, 3, 9])
def test_qmatmul_is_llama_cpp_arithmetic(rng, threads, t, m):
    """Activations quantized as llama.cpp does, then exact integer block sums: equal to the
    reference up to float32 rounding of the per-block scales (not merely 'close to fp32')."""
    kernels.set_num_threads(2)
    raw = ref.random_blocks(rng, t, 67, 768 if t not in ref.K_QUANTS else 512)
    k = kernels.qdequant(raw, t).shape[1]
    x = (rng.standard_normal((m, k)) * 4).astype(np.float32)
    x[0, :5] = 0.0  # a zero run, and a zero row below: amax 0 must give 0, not NaN
    if m > 2:
        x[2] = 0.0
    y = kernels.qmatmul(x, raw, t)
    want = ref.qmatmul(x, raw, t)
    np.testing.assert_allclose(y, want, rtol=2e-5, atol=2e-5 * np.abs(want).max())
    exact = x.astype(np.float64) @ ref.dequant(raw, t).astype(np.float64).T
    assert np.abs(y - exact).max() > 1e-4 * np.abs(exact).max(), "activations were not quantized"
    np.testing.assert_array_equal(kernels.qmatmul(x[0], raw, t), y[0])  # 1-D x -> [N]


@pytest.mark.parametrize("t", TYPES)
def test_qmatmul_16bit_many_rows_is_fp32(rng, threads, t):
    """From 16 rows on (prefill), weight panels are dequantized once into the fp32 GEMM."""
    kernels.set_num_threads(2)
    raw = ref.random_blocks(rng, t, 150, 512)
    x = (rng.standard_normal((37, 512)) * 4).astype(np.float32)
    exact = x.astype(np.float64) @ ref.dequant(raw, t).astype(np.float64).T
    y = kernels.qmatmul(x, raw, t, act_bits=16)
    np.testing.assert_allclose(y, exact, rtol=1e-5, atol=1e-5 * np.abs(exact).max())


@pytest.mark.parametrize("t", TYPES)
@pytest.mark.parametrize("m", [1, 6])
def test_qmatmul_16bit_activations(rng, threads, t, m):
    """act_bits=16: the reference's 16-bit rounding exactly, and ~300x closer to fp32 than 8 bits."""
    kernels.set_num_threads(2)
    raw = ref.random_blocks(rng, t, 41, 512)
    x = (rng.standard_normal((m, 512)) * 4).astype(np.float32)
    x[0, 32:64] = 0.0
    y = kernels.qmatmul(x, raw, t, act_bits=16)
    want = ref.qmatmul(x, raw, t, act_bits=16)
    np.testing.assert_allclose(y, want, rtol=2e-5, atol=2e-6 * np.abs(want).max())
    exact = x.astype(np.float64) @ ref.dequant(raw, t).astype(np.float64).T
    err16 = np.abs(y - exact).max()
    err8 = np.abs(kernels.qmatmul(x, raw, t) - exact).max()
    assert err16 * 50 < err8


def test_qmatmul_threads_give_identical_results(rng, threads):
    raw = ref.random_blocks(rng, ref.Q4_K, 300, 1024)
    x = rng.standard_normal((5, 1024)).astype(np.float32)
    for bits in (8, 16):
        kernels.set_num_threads(1)
        a = kernels.qmatmul(x, raw, ref.Q4_K, act_bits=bits)
        kernels.set_num_threads(2)
        np.testing.assert_array_equal(kernels.qmatmul(x, raw, ref.Q4_K, act_bits=bits), a)


def test_fp16_conversions_are_exact():
    lib = kernels._lib
    codes = np.arange(0, 65536, 7, dtype=np.uint16)
    got = np.array([lib.c6_f16_to_f32(int(c)) for c in codes], np.float32)
    want = codes.view(np.float16).astype(np.float32)
    finite = np.isfinite(want)
    np.testing.assert_array_equal(got[finite], want[finite])
    assert np.isnan(got[np.isnan(want)]).all()
    rng = np.random.default_rng(3)
    xs = np.concatenate([rng.standard_normal(3000) * 10.0 ** rng.integers(-9, 6, 3000),
                         [0.0, -0.0, 65504.0, 65519.99, 65520.0, 1e9, 6e-8, 2.9e-8, 3.0e-8, np.inf, -np.inf]])
    xs = xs.astype(np.float32)
    got16 = np.array([lib.c6_f32_to_f16(float(v)) for v in xs], np.uint16)
    with np.errstate(over="ignore"):  # numpy warns on the values that round to inf
        want16 = xs.astype(np.float16).view(np.uint16)
    np.testing.assert_array_equal(got16, want16)


def test_qmatmul_rejects_bad_arguments(rng):
    raw = ref.random_blocks(rng, ref.Q8_0, 4, 64)
    with pytest.raises(ValueError, match="not supported"):
        kernels.qmatmul(np.zeros((1, 64), np.float32), raw, 1)  # F16 id: no block kernel
    with pytest.raises(ValueError, match="last dim 64"):
        kernels.qmatmul(np.zeros((1, 32), np.float32), raw, ref.Q8_0)
    with pytest.raises(ValueError, match="whole number"):
        kernels.qmatmul(np.zeros((1, 64), np.float32), np.ascontiguousarray(raw[:, :33]), ref.Q8_0)
    with pytest.raises(TypeError):
        kernels.qmatmul(np.zeros((1, 64), np.float32), raw.view(np.int8), ref.Q8_0)
    with pytest.raises(ValueError, match="act_bits"):
        kernels.qmatmul(np.zeros((1, 64), np.float32), raw, ref.Q8_0, act_bits=4)
