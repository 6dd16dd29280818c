"""GGUF tensor -> float32 [rows, cols] for our fp32 matmul (dequantized once, at load)."""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import quants

from .errors import UnsupportedModel

# Quantized types whose gguf.quants reference dequantizer we rely on (numpy-vectorised).
SUPPORTED = {
    QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1,
    QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K,
}

# Rows per dequantization step: bounds the float64/int temporaries of the reference code.
_ROWS_PER_STEP = 8192


def dequantize(data: np.ndarray, qtype: QT) -> np.ndarray:
    """`data` is the reader's view (memory-mapped). F32 stays a zero-copy view of the file."""
    if qtype not in SUPPORTED:
        raise UnsupportedModel(f"GGUF tensor type {qtype.name} is not supported by the native engine")
    if qtype == QT.F32:
        return np.ascontiguousarray(data, dtype=np.float32)  # no copy: the mmap view itself
    if qtype == QT.F16:
        return data.astype(np.float32)
    if data.ndim == 1:
        return np.ascontiguousarray(quants.dequantize(data, qtype), dtype=np.float32)
    rows = data.shape[0]
    first = quants.dequantize(data[:1], qtype)
    out = np.empty((rows, first.shape[-1]), dtype=np.float32)
    for r0 in range(0, rows, _ROWS_PER_STEP):
        r1 = min(rows, r0 + _ROWS_PER_STEP)
        out[r0:r1] = quants.dequantize(data[r0:r1], qtype)
    return out
