"""Row independence of the int16-activation quantized matmul (continuous batching): for every block
type and every M below the fp32-panel threshold (16), row i of qmatmul(x[:M]) is bit-identical to
qmatmul(x[i:i+1]) alone, whatever the other rows hold (large, tiny, zero, mixed-scale rows), and it
stays within the reference's tolerance."""
import numpy as np
import pytest
from quant_ref import BLOCK, random_blocks
from quant_ref import qmatmul as ref_qmatmul

from capibara6 import kernels

TYPES = {"Q4_0": 2, "Q5_0": 6, "Q8_0": 8, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14}


def _acts(rng, m, k):
    x = rng.standard_normal((m, k)).astype(np.float32)
    x[1::3] *= np.float32(3e4)                            # large-magnitude rows
    x[2::5] *= np.float32(1e-6)                           # tiny rows
    if m > 3:
        x[3, : k // 2] = 0.0                              # zero chunks (scale 0)
        x[3, k // 2:] = np.where(rng.random(k - k // 2) < 0.5, -1e4, 1e4)  # full-scale sign patterns
    if m > 6:
        x[6] = np.float32(65504.0) * np.sign(rng.standard_normal(k)).astype(np.float32)
    return x


@pytest.mark.parametrize("name", list(TYPES))
def test_rows_bit_identical_for_every_m(name, threads):
    t = TYPES[name]
    qk = BLOCK[t][0]
    rng = np.random.default_rng(7 + t)
    kernels.set_num_threads(1)
    # K: several blocks, and for the 32-blocks a count that is not a multiple of 4 or 8
    for n, k in ((37, 9 * qk if qk == 32 else 2 * qk), (19, 3 * qk if qk == 256 else 32 * 13)):
        w = random_blocks(rng, t, n, k)
        x = _acts(rng, 15, k)
        alone = np.stack([kernels.qmatmul(x[i:i + 1], w, t, act_bits=16)[0] for i in range(15)])
        np.testing.assert_allclose(alone, ref_qmatmul(x, w, t, act_bits=16), rtol=2e-5,
                                   atol=2e-5 * float(np.abs(alone).max()))
        assert np.array_equal(kernels.qmatmul(x[0], w, t, act_bits=16), alone[0])
        for m in range(1, 16):
            y = kernels.qmatmul(x[:m], w, t, act_bits=16)
            assert np.array_equal(y, alone[:m]), (name, n, k, m)
        # the same row at every position of a batch, next to different neighbours
        for m in (2, 5, 8, 11, 15):
            xs = _acts(rng, m, k)
            for i in range(m):
                xi = xs.copy()
                xi[i] = x[4]
                assert np.array_equal(kernels.qmatmul(xi, w, t, act_bits=16)[i], alone[4]), (name, m, i)


@pytest.mark.parametrize("name", list(TYPES))
def test_rows_independent_of_thread_count(name, threads):
    t = TYPES[name]
    qk = BLOCK[t][0]
    rng = np.random.default_rng(3 + t)
    w = random_blocks(rng, t, 203, 4 * qk if qk == 256 else 640)
    x = _acts(rng, 9, w.shape[1] // BLOCK[t][1] * qk)
    kernels.set_num_threads(1)
    y1 = kernels.qmatmul(x, w, t, act_bits=16)
    kernels.set_num_threads(2)
    y2 = kernels.qmatmul(x, w, t, act_bits=16)
    assert np.array_equal(y1, y2)
    for i in range(9):
        assert np.array_equal(kernels.qmatmul(x[i], w, t, act_bits=16), y1[i])
