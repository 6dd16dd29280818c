"""kernels.qmatmul at the shapes the NEON in-register paths split on: odd block counts, N not a
multiple of 4 (decode takes 4 weight rows per pass, the rest one by one), M from 1 to 5. A row's
result must not depend on M or on the thread count (bit-exact), and match the reference's
activation rounding then exact sums (the tolerance of test_quant.py)."""
import numpy as np
import pytest
import quant_ref as ref

from capibara6 import kernels

TYPES = [ref.Q4_0, ref.Q5_0, ref.Q8_0, ref.Q4_K, ref.Q5_K, ref.Q6_K]


@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("t", TYPES)
def test_quant_odd_shapes_and_row_independence(rng, threads, t, bits):
    k = 768 if t in ref.K_QUANTS else 224  # 3 k-blocks / 7 32-blocks
    raw = ref.random_blocks(rng, t, 39, k)
    x = (rng.standard_normal((5, k)) * 3).astype(np.float32)
    kernels.set_num_threads(2)
    y = kernels.qmatmul(x, raw, t, act_bits=bits)
    want = ref.qmatmul(x, raw, t, act_bits=bits)
    atol = (2e-5 if bits == 8 else 2e-6) * np.abs(want).max()
    np.testing.assert_allclose(y, want, rtol=2e-5, atol=atol)
    for m in (1, 2, 4):
        np.testing.assert_array_equal(kernels.qmatmul(x[:m], raw, t, act_bits=bits), y[:m])
    kernels.set_num_threads(1)
    np.testing.assert_array_equal(kernels.qmatmul(x[:1], raw, t, act_bits=bits), y[:1])
    np.testing.assert_array_equal(kernels.qmatmul(x[1:2], raw, t, act_bits=bits), y[1:2])
