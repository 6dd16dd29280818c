"""Pooling of final hidden states into one embedding vector (native engine; llama.cpp pools in C).

The same meanings as llama.cpp's `LLAMA_POOLING_TYPE_*`: mean over the input's tokens, the first
token's state (cls) or the last one's (last). Normalising is ours on both backends (float64 norm).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..types import InputTooLong, Pooling, Prepared


def pool(states: np.ndarray, pooling: Pooling) -> np.ndarray:
    """states [T, n_embd] (one input's final normed hidden states) -> [n_embd] float32."""
    if pooling == "mean":
        return states.mean(axis=0, dtype=np.float64).astype(np.float32)
    return np.array(states[0 if pooling == "cls" else -1], dtype=np.float32)


def normalized(v: np.ndarray) -> np.ndarray:
    """v / ||v||_2 (float32); a zero vector stays zero."""
    n = float(np.linalg.norm(v.astype(np.float64)))
    return (v / n).astype(np.float32) if n > 0 else v.astype(np.float32)


def check_inputs(prepared: Sequence[Prepared], n_ctx: int) -> list[list[int]]:
    """Each input's token ids; InputTooLong naming the first index that does not fit n_ctx."""
    out = []
    for i, p in enumerate(prepared):
        ids = list(p.tokens or ())
        if len(ids) > n_ctx:
            raise InputTooLong(i, len(ids), n_ctx)
        out.append(ids)
    return out
