"""GGUF block-quantized matrices for tiny test models: Q4_0/Q5_0/Q8_0 through gguf's quantizer,
k-quants (which gguf cannot quantize) as random blocks scaled to ~N(0, 1/cols) values."""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, quants
from gguf import GGMLQuantizationType as QT

# value spread per unit block scale d (sub-block scales and quants uniform): std of d*sc*q (-dmin*m)
_K_SPREAD = {QT.Q4_K: (143.0, 7.5), QT.Q5_K: (285.0, 15.5), QT.Q6_K: (1369.0, 0.0)}


def _f16_bytes(v: np.ndarray) -> np.ndarray:
    return v.astype(np.float16).view(np.uint8).reshape(v.shape + (2,))


def quantized(rng: np.random.Generator, qt: QT, rows: int, cols: int) -> np.ndarray:
    """uint8 [rows, row_bytes] of type qt with values of std ~ 1/sqrt(cols)."""
    if qt not in _K_SPREAD:
        return quants.quantize((rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32), qt)
    block, nbytes = GGML_QUANT_SIZES[qt]
    nb = cols // block
    raw = rng.integers(0, 256, size=(rows, nb, nbytes), dtype=np.uint8)
    spread, center = _K_SPREAD[qt]
    d = np.full((rows, nb), 1.0 / (spread * np.sqrt(cols)))
    if qt == QT.Q6_K:
        raw[:, :, 208:210] = _f16_bytes(d)
    else:
        raw[:, :, 0:2] = _f16_bytes(d)
        raw[:, :, 2:4] = _f16_bytes(d * center)  # dmin: centres d*sc*q - dmin*m near 0
    return raw.reshape(rows, nb * nbytes)
