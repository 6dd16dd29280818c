"""Weight matrices kept in their GGUF block format, multiplied without dequantizing.

`QWeight` is a view of the memory-mapped file (rows of Q4_0/Q5_0/Q8_0/Q4_K/Q5_K/Q6_K blocks):
it costs no anonymous memory, and decode reads 4.5-8.5 bits per weight instead of 32. The ops
(`kernels.qmatmul` or the numpy reference) round activations per block of 32 to 16 bits (close
to fp32: the default) or to llama.cpp's 8-bit Q8_0/Q8_K (llama.cpp's arithmetic exactly).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT

# Types with a qmatmul kernel (the rest are dequantized to fp32 at load).
MATMUL_TYPES = frozenset({QT.Q4_0, QT.Q5_0, QT.Q8_0, QT.Q4_K, QT.Q5_K, QT.Q6_K})


@dataclass(frozen=True)
class QWeight:
    raw: np.ndarray  # uint8 [rows, row_bytes], a view of the file's mapping
    qtype: QT

    @property
    def shape(self) -> tuple[int, int]:
        block, nbytes = GGML_QUANT_SIZES[self.qtype]
        return self.raw.shape[0], self.raw.shape[1] // nbytes * block

    @property
    def nbytes(self) -> int:
        return int(self.raw.nbytes)

    def rows(self, ops: ModuleType, idx: np.ndarray) -> np.ndarray:
        """float32 [len(idx), K]: only the selected rows are dequantized (embedding lookup)."""
        return ops.qdequant(np.ascontiguousarray(self.raw[idx]), int(self.qtype))


Weight = np.ndarray | QWeight


MATMUL_MODES = {"int16": 16, "int8": 8, "fp32": 0}  # activation bits for QWeight (fp32: none are kept)


def matmul(ops: ModuleType, x: np.ndarray, w: Weight, act_bits: int = 16) -> np.ndarray:
    """y[M, N] = x[M, K] @ w[N, K]^T for an fp32 or a block-quantized weight (activations rounded
    to act_bits per block of 32: 16 ~ fp32, 8 = llama.cpp's Q8_0/Q8_K)."""
    if isinstance(w, QWeight):
        return ops.qmatmul(x, w.raw, int(w.qtype), act_bits=act_bits)
    return ops.matmul(x, w)


def embed_rows(ops: ModuleType, w: Weight, tokens: np.ndarray) -> np.ndarray:
    if isinstance(w, QWeight):
        return w.rows(ops, tokens)
    return np.ascontiguousarray(w[tokens], dtype=np.float32)


# The most rows a matmul may have and still take the row kernels, whose result for a row does not
# depend on the other rows (checked bit for bit): qmatmul below 16 rows (then fp32 panels), the
# fp32 matmul up to 4 (GEMV; then GEMM). Each path is row-independent on its own, not across.
ROW_PATH_MAX = {"q": 15, "f": 4}


@dataclass(frozen=True)
class RowPlan:
    """How a batched pass splits its rows so that every row takes the kernel path it takes when
    its sequence runs alone: rows of segments short enough for the row kernels go in calls of at
    most ROW_PATH_MAX rows, the rows of the longer (prefill) segments in one call. Weights are
    read once per call: once per step while the short rows fit one call (decode of up to 15
    sequences on quantized weights)."""

    small: tuple[np.ndarray | slice, ...]
    big: np.ndarray | None

    @classmethod
    def of(cls, counts: list[int], limit: int) -> RowPlan:
        small: list[int] = []
        big: list[int] = []
        start = 0
        for n in counts:
            (small if n <= limit else big).extend(range(start, start + n))
            start += n
        chunks = [np.asarray(small[i : i + limit], np.int64) for i in range(0, len(small), limit)]
        return cls(tuple(_as_slice(c) for c in chunks), np.asarray(big, np.int64) if big else None)


def _as_slice(idx: np.ndarray) -> np.ndarray | slice:
    lo = int(idx[0])
    return slice(lo, lo + idx.size) if int(idx[-1]) - lo + 1 == idx.size else idx


def matmul_rows(ops: ModuleType, x: np.ndarray, w: Weight, act_bits: int, plans: dict[str, RowPlan]) -> np.ndarray:
    """`matmul` of a batched pass, row paths as `RowPlan` says (plans["q"] for block-quantized
    weights, plans["f"] for fp32 ones)."""
    plan = plans["q" if isinstance(w, QWeight) else "f"]
    if plan.big is None and len(plan.small) == 1 and isinstance(plan.small[0], slice):
        return matmul(ops, x, w, act_bits)  # one call covers every row (decode-only step)
    y = np.empty((x.shape[0], w.shape[0]), np.float32)
    for part in (*plan.small, *(() if plan.big is None else (plan.big,))):
        y[part] = matmul(ops, np.ascontiguousarray(x[part]), w, act_bits)
    return y
