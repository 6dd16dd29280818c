"""GGUF tensors as memory-mapped numpy views (the header itself is read by capibara6.gguf_header).

Tensors are views of one np.memmap: loading maps the file, it copies nothing.
"""

from __future__ import annotations

import pathlib
from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..gguf_header import StringArray, read_header


@dataclass(frozen=True)
class TensorView:
    name: str
    tensor_type: GGMLQuantizationType
    data: np.ndarray  # F32/F16: typed [rows, cols] (numpy order); others: uint8 [rows, row_bytes]
    n_bytes: int


class GGUFFile:
    def __init__(self, path: str | pathlib.Path) -> None:
        header = read_header(path)
        self.path = header.path
        self.metadata: dict[str, object] = header.metadata
        mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        self.tensors: list[TensorView] = []
        for info in header.tensors:
            qt = GGMLQuantizationType(info.ggml_type)
            block, tsize = GGML_QUANT_SIZES[qt]
            n_bytes = int(np.prod(info.dims)) // block * tsize
            start = header.data_start + info.offset
            raw = mm[start : start + n_bytes]
            shape = tuple(reversed(info.dims))  # numpy order: rows last-dim-first
            data: np.ndarray
            if qt == GGMLQuantizationType.F32:
                data = raw.view(np.float32).reshape(shape)
            elif qt == GGMLQuantizationType.F16:
                data = raw.view(np.float16).reshape(shape)
            else:
                data = raw.reshape(shape[:-1] + (shape[-1] // block * tsize,))
            self.tensors.append(TensorView(info.name, qt, np.asarray(data), n_bytes))
        self._mm = mm


__all__ = ["GGUFFile", "StringArray", "TensorView"]
