"""The one GGUF (v2/v3) header reader: metadata and tensor infos, read straight from the mapped file.

Used by the backends' memory estimates (before a model loads), by the native engine's loader (its
tensors become views of one np.memmap) and by `capibara6 doctor`. gguf.GGUFReader builds numpy
objects for every vocabulary entry (262k for Gemma: ~25 s and hundreds of MB of peak RSS); here
string arrays are skipped (their length is kept) and numeric arrays are read as one numpy array.

Memory estimates (measured reasons in the pool's docstring):
    first instance  = weights file size + sequence memory + compute overhead
    extra instance  = sequence memory + compute overhead (weights are mmapped: the OS shares the pages)
    sequence memory = KV of the attention layers for n_ctx + recurrent state x parallel sequences
State-space and RWKV layers keep a fixed-size F32 state per sequence instead of KV cells (sizes
read from the header as llama.cpp derives them: docs/ssm.md); hybrids have both.
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


# Architectures whose every layer is recurrent (llama.cpp's llm_arch_is_recurrent): no KV cache.
RECURRENT_ARCHS = frozenset({"mamba", "mamba2", "rwkv6", "rwkv6qwen2", "rwkv7", "arwkv7"})
# Hybrids whose every layer has attention AND a recurrent mixer side by side (falcon-h1); other
# hybrids (jamba, granitehybrid, nemotron_h, lfm2) give `head_count_kv` per layer, 0 = recurrent.
PARALLEL_HYBRID_ARCHS = frozenset({"falcon-h1"})
STATE_ELEM_BYTES = 4  # llama.cpp keeps recurrent state in F32 (type_r, type_s), whatever kv_cache says


def _per_layer(meta: dict[str, Any], key: str, layers: int, default: int) -> list[int]:
    """A hyperparameter llama.cpp allows per layer (a GGUF array) or once (a scalar)."""
    v = meta.get(key, default)
    if isinstance(v, np.ndarray):
        return [int(x) for x in v[:layers]] + [int(v[-1]) if len(v) else default] * max(0, layers - len(v))
    return [int(v if v is not None else default)] * layers


def is_recurrent(meta: dict[str, Any]) -> bool:
    """The model keeps a recurrent state per sequence (SSM, RWKV, a hybrid), read from the header."""
    arch = meta.get("general.architecture", "")
    return arch in RECURRENT_ARCHS or any(f"{arch}.{k}" in meta for k in ("ssm.conv_kernel", "wkv.head_size", "shortconv.l_cache"))


def recurrent_layers(meta: dict[str, Any]) -> list[bool]:
    """Per layer: does it hold a recurrent state? (llama.cpp's hparams.is_recurrent(il))"""
    arch = meta.get("general.architecture", "")
    n = int(meta.get(f"{arch}.block_count", 0))
    if not is_recurrent(meta):
        return [False] * n
    if arch in RECURRENT_ARCHS or arch in PARALLEL_HYBRID_ARCHS:
        return [True] * n
    return [kv == 0 for kv in _per_layer(meta, f"{arch}.attention.head_count_kv", n, 0)]


def attention_layers(meta: dict[str, Any]) -> list[bool]:
    """Per layer: does it hold K and V for every cell? Pure recurrent models have none."""
    arch = meta.get("general.architecture", "")
    if arch in RECURRENT_ARCHS:
        return []
    recurrent = recurrent_layers(meta)
    return [arch in PARALLEL_HYBRID_ARCHS or not r for r in recurrent]


def recurrent_state_floats(meta: dict[str, Any]) -> tuple[int, int]:
    """(r, s): floats of the two per-layer states of one sequence, as llama.cpp sizes them
    (hparams n_embd_r / n_embd_s). RWKV: r = token shift (token_shift_count x n_embd), s = wkv
    (n_embd x head_size). Mamba/Mamba-2: r = conv window ((d_conv - 1) x (d_inner + 2 n_group
    d_state)), s = ssm (d_state x d_inner). LFM2: r = short conv (n_embd x (l_cache - 1)), s = 0."""
    arch = meta.get("general.architecture", "")
    embd = int(meta.get(f"{arch}.embedding_length", 0))

    def get(key: str, default: int = 0) -> int:
        return int(meta.get(f"{arch}.{key}", default) or default)

    if get("wkv.head_size"):
        return get("token_shift_count", 2) * embd, embd * get("wkv.head_size")
    if get("shortconv.l_cache"):
        return embd * (get("shortconv.l_cache") - 1), 0
    d_conv, d_inner, d_state, groups = get("ssm.conv_kernel"), get("ssm.inner_size"), get("ssm.state_size"), get("ssm.group_count")
    return max(0, d_conv - 1) * (d_inner + 2 * groups * d_state), d_state * d_inner


def recurrent_state_bytes(meta: dict[str, Any]) -> int:
    """Bytes of recurrent state ONE sequence holds (0 for a transformer): constant in its length."""
    r, s = recurrent_state_floats(meta)
    return sum(recurrent_layers(meta)) * (r + s) * STATE_ELEM_BYTES


def kv_cache_bytes(meta: dict[str, Any], n_ctx: int, kv_cache: str | None) -> int:
    """K and V for every attention layer at full n_ctx (an upper bound: sliding-window layers may
    use less); 0 for a pure SSM/RWKV model, only the attention layers of a hybrid."""
    arch = meta.get("general.architecture", "")
    attn = attention_layers(meta)
    layers = len(attn) if attn else (0 if arch in RECURRENT_ARCHS else int(meta.get(f"{arch}.block_count", 0)))
    heads = _per_layer(meta, f"{arch}.attention.head_count", layers, 1)
    kv_heads = _per_layer(meta, f"{arch}.attention.head_count_kv", layers, 0)
    embd = int(meta.get(f"{arch}.embedding_length", 0))
    per_elem = KV_ELEM_BYTES.get(kv_cache or "f16", 2.0)
    total = 0.0
    for il in range(layers):
        if attn and not attn[il]:
            continue
        h = heads[il] or 1
        hkv = kv_heads[il] or h
        k_len = int(meta.get(f"{arch}.attention.key_length", embd // h))
        v_len = int(meta.get(f"{arch}.attention.value_length", k_len))
        total += n_ctx * hkv * (k_len + v_len) * per_elem
    return int(total)


def sequence_memory_bytes(meta: dict[str, Any], n_ctx: int, kv_cache: str | None, n_seq: int = 1) -> int:
    """What llama.cpp allocates for sequences at context creation: the KV cache of the attention
    layers (n_ctx cells shared by all sequences: capibara6 makes one unified cache) plus one
    recurrent state per parallel sequence (llama_memory_recurrent has n_seq_max cells)."""
    return kv_cache_bytes(meta, n_ctx, kv_cache) + max(1, n_seq) * recurrent_state_bytes(meta)


def file_kv_cache_bytes(path: Path, n_ctx: int, kv_cache: str | None, n_seq: int = 1) -> int:
    """sequence_memory_bytes from a GGUF file's header; 0 if it cannot be read."""
    try:
        return sequence_memory_bytes(read_header(path).metadata, n_ctx, kv_cache, n_seq)
    except (ValueError, OSError):
        return 0


def estimate_file(path: Path, n_ctx: int, kv_cache: str | None, n_seq: int = 1) -> Estimate:
    """Weights as stored in the file, KV for n_ctx plus recurrent state for n_seq sequences, and
    the compute overhead."""
    weights = path.stat().st_size
    try:
        kv = sequence_memory_bytes(read_header(path).metadata, n_ctx, kv_cache, n_seq)
    except (ValueError, OSError):
        kv = 0  # not a readable GGUF: the load itself will fail and say why
    return Estimate(weights, kv, max(MIN_OVERHEAD, weights // 20))


__all__ = ["KV_ELEM_BYTES", "MIN_OVERHEAD", "GGUFHeader", "StringArray", "TensorInfo", "attention_layers",
           "estimate_file", "file_kv_cache_bytes", "is_recurrent", "kv_cache_bytes", "read_header",
           "recurrent_layers", "recurrent_state_bytes", "recurrent_state_floats", "sequence_memory_bytes"]
