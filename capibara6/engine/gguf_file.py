"""Minimal GGUF (v2/v3) parser: metadata and memory-mapped tensor views.

gguf.GGUFReader builds numpy objects for every vocabulary entry (262k for Gemma): seconds of load
time and hundreds of MB of peak RSS. Here string arrays are skipped (only their length is kept),
numeric arrays are read as one numpy array, and tensors are views of one np.memmap.
"""

from __future__ import annotations

import pathlib
import struct
from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NP = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
       7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class StringArray:
    """A string array from the metadata, kept as its length only (e.g. tokenizer.ggml.tokens)."""

    count: int

    def __len__(self) -> int:
        return self.count


@dataclass(frozen=True)
class TensorView:
    name: str
    tensor_type: GGMLQuantizationType
    data: np.ndarray  # F32/F16: typed [rows, cols] (numpy order); others: uint8 [rows, row_bytes]
    n_bytes: int


class GGUFFile:
    def __init__(self, path: str | pathlib.Path) -> None:
        self.path = pathlib.Path(path)
        mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        buf = memoryview(mm.data)
        if bytes(buf[:4]) != b"GGUF":
            raise ValueError(f"{self.path} is not a GGUF file")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
        if version < 2:
            raise ValueError(f"GGUF version {version} is not supported")
        off = 24
        self.metadata: dict[str, object] = {}
        for _ in range(n_kv):
            key, off = self._str(buf, off)
            (vtype,), off = struct.unpack_from("<I", buf, off), off + 4
            self.metadata[key], off = self._value(buf, off, vtype)
        infos = []
        for _ in range(n_tensors):
            name, off = self._str(buf, off)
            (n_dims,) = struct.unpack_from("<I", buf, off)
            dims = struct.unpack_from(f"<{n_dims}Q", buf, off + 4)
            ttype, t_off = struct.unpack_from("<IQ", buf, off + 4 + 8 * n_dims)
            off += 4 + 8 * n_dims + 12
            infos.append((name, dims, GGMLQuantizationType(ttype), t_off))
        align = int(self.metadata.get("general.alignment", 32))  # type: ignore[call-overload]
        data_start = -(-off // align) * align
        self.tensors: list[TensorView] = []
        for name, dims, qt, t_off in infos:
            block, tsize = GGML_QUANT_SIZES[qt]
            n_elems = int(np.prod(dims))
            n_bytes = n_elems // block * tsize
            raw = mm[data_start + t_off : data_start + t_off + n_bytes]
            shape = tuple(reversed([int(d) for d in dims]))  # numpy order: rows last-dim-first
            data: np.ndarray
            if qt == GGMLQuantizationType.F32:
                data = raw.view(np.float32).reshape(shape)
            elif qt == GGMLQuantizationType.F16:
                data = raw.view(np.float16).reshape(shape)
            else:
                data = raw.reshape(shape[:-1] + (shape[-1] // block * tsize,))
            self.tensors.append(TensorView(name, qt, np.asarray(data), n_bytes))
        self._mm = mm

    @staticmethod
    def _str(buf: memoryview, off: int) -> tuple[str, int]:
        (n,) = struct.unpack_from("<Q", buf, off)
        return bytes(buf[off + 8 : off + 8 + n]).decode("utf-8", errors="replace"), off + 8 + n

    def _value(self, buf: memoryview, off: int, vtype: int) -> tuple[object, int]:
        if vtype == _STRING:
            return self._str(buf, off)
        if vtype in _SCALARS:
            fmt = _SCALARS[vtype]
            return struct.unpack_from(fmt, buf, off)[0], off + struct.calcsize(fmt)
        if vtype == _ARRAY:
            etype, count = struct.unpack_from("<IQ", buf, off)
            off += 12
            if etype == _STRING:
                for _ in range(count):  # walk the lengths only
                    (n,) = struct.unpack_from("<Q", buf, off)
                    off += 8 + n
                return StringArray(count), off
            if etype in _NP:
                arr: np.ndarray = np.frombuffer(buf, dtype=_NP[etype], count=count, offset=off).copy()
                return arr, off + arr.nbytes
            items = []
            for _ in range(count):  # nested arrays: rare, generic path
                v, off = self._value(buf, off, etype)
                items.append(v)
            return items, off
        raise ValueError(f"unknown GGUF value type {vtype}")
