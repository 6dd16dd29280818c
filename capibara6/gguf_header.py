"""The one GGUF (v2/v3) header reader: metadata and tensor infos, read straight from the mapped file.

Used by the backends' memory estimates (before a model loads), by the native engine's loader (its
tensors become views of one np.memmap) and by `capibara6 doctor`. gguf.GGUFReader builds numpy
objects for every vocabulary entry (262k for Gemma: ~25 s and hundreds of MB of peak RSS); here
string arrays are skipped (their length is kept) and numeric arrays are read as one numpy array.

Memory estimates (measured reasons in the pool's docstring):
    first instance  = weights file size + KV cache for n_ctx + compute overhead
    extra instance  = KV cache + compute overhead (weights are mmapped: the OS shares the pages)
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .types import Estimate

MIN_OVERHEAD = 32 * 1024**2  # compute buffers, logits, tokenizer tables

# bytes per element of a KV cache type (block-quantized types include their scales)
KV_ELEM_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q5_1": 24 / 32, "q5_0": 22 / 32,
                 "q4_1": 20 / 32, "q4_0": 18 / 32, "fp32": 4.0, "fp16": 2.0, "fp8": 1.0 + 4 / 256}

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
class TensorInfo:
    name: str
    dims: tuple[int, ...]  # GGUF order: fastest-varying first
    ggml_type: int
    offset: int  # from the start of the tensor data


@dataclass(frozen=True)
class GGUFHeader:
    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: tuple[TensorInfo, ...]
    data_start: int  # file offset of the tensor data (aligned)


def read_header(path: str | Path) -> GGUFHeader:
    """Parse the header of a GGUF file. Raises ValueError when it is not a readable GGUF."""
    p = Path(path)
    with p.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        try:
            return _parse(p, m)
        except struct.error as err:
            raise ValueError(f"{p}: truncated GGUF header ({err})") from None


def _parse(path: Path, m: mmap.mmap) -> GGUFHeader:
    if m[:4] != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file")
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", m, 4)
    if version < 2:
        raise ValueError(f"{path}: GGUF version {version} is not supported")
    pos = 24
    meta: dict[str, Any] = {}
    for _ in range(n_kv):
        key, pos = _string(m, pos)
        (vtype,) = struct.unpack_from("<I", m, pos)
        meta[key], pos = _value(m, pos + 4, vtype)
    infos = []
    for _ in range(n_tensors):
        name, pos = _string(m, pos)
        (n_dims,) = struct.unpack_from("<I", m, pos)
        dims = struct.unpack_from(f"<{n_dims}Q", m, pos + 4)
        ttype, t_off = struct.unpack_from("<IQ", m, pos + 4 + 8 * n_dims)
        pos += 4 + 8 * n_dims + 12
        infos.append(TensorInfo(name, tuple(int(d) for d in dims), int(ttype), int(t_off)))
    align = int(meta.get("general.alignment", 32))
    return GGUFHeader(path, int(version), meta, tuple(infos), -(-pos // align) * align)


def _string(m: mmap.mmap, pos: int) -> tuple[str, int]:
    (n,) = struct.unpack_from("<Q", m, pos)
    return bytes(m[pos + 8 : pos + 8 + n]).decode("utf-8", "replace"), pos + 8 + n


def _value(m: mmap.mmap, pos: int, vtype: int) -> tuple[Any, int]:
    if vtype == _STRING:
        return _string(m, pos)
    if vtype in _SCALARS:
        fmt = _SCALARS[vtype]
        return struct.unpack_from(fmt, m, pos)[0], pos + struct.calcsize(fmt)
    if vtype == _ARRAY:
        etype, count = struct.unpack_from("<IQ", m, pos)
        pos += 12
        if etype == _STRING:
            for _ in range(count):  # walk the lengths only
                (n,) = struct.unpack_from("<Q", m, pos)
                pos += 8 + n
            return StringArray(count), pos
        if etype in _NP:
            arr: np.ndarray = np.frombuffer(m, dtype=_NP[etype], count=count, offset=pos).copy()
            return arr, pos + arr.nbytes
        items = []
        for _ in range(count):  # nested arrays: rare, generic path
            v, pos = _value(m, pos, etype)
            items.append(v)
        return items, pos
    raise ValueError(f"unknown GGUF value type {vtype}")


def kv_cache_bytes(meta: dict[str, Any], n_ctx: int, kv_cache: str | None) -> int:
    """K and V for every layer at full n_ctx (an upper bound: sliding-window layers may use less)."""
    arch = meta.get("general.architecture", "")
    layers = int(meta.get(f"{arch}.block_count", 0))
    heads = int(meta.get(f"{arch}.attention.head_count", 1) or 1)
    kv_heads = int(meta.get(f"{arch}.attention.head_count_kv", heads) or heads)
    embd = int(meta.get(f"{arch}.embedding_length", 0))
    k_len = int(meta.get(f"{arch}.attention.key_length", embd // heads if heads else 0))
    v_len = int(meta.get(f"{arch}.attention.value_length", k_len))
    per_elem = KV_ELEM_BYTES.get(kv_cache or "f16", 2.0)
    return int(n_ctx * layers * kv_heads * (k_len + v_len) * per_elem)


def file_kv_cache_bytes(path: Path, n_ctx: int, kv_cache: str | None) -> int:
    """kv_cache_bytes from a GGUF file's header; 0 if it cannot be read."""
    try:
        return kv_cache_bytes(read_header(path).metadata, n_ctx, kv_cache)
    except (ValueError, OSError):
        return 0


def estimate_file(path: Path, n_ctx: int, kv_cache: str | None) -> Estimate:
    """Weights as stored in the file, KV for n_ctx, and the compute overhead."""
    weights = path.stat().st_size
    try:
        kv = kv_cache_bytes(read_header(path).metadata, n_ctx, kv_cache)
    except (ValueError, OSError):
        kv = 0  # not a readable GGUF: the load itself will fail and say why
    return Estimate(weights, kv, max(MIN_OVERHEAD, weights // 20))


__all__ = ["KV_ELEM_BYTES", "MIN_OVERHEAD", "GGUFHeader", "StringArray", "TensorInfo", "estimate_file",
           "file_kv_cache_bytes", "kv_cache_bytes", "read_header"]
