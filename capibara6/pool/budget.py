"""Memory estimates and least-recently-used eviction, decided BEFORE a model loads.

A model's cost is estimated from its GGUF header (read directly: gguf's GGUFReader parses every
vocabulary string in Python and takes ~25 s on Gemma's 262k vocab) and its registry entry:

    first instance  = weights file size + KV cache for n_ctx + compute overhead
    extra instance  = KV cache + compute overhead (llama.cpp mmaps weights: the OS shares the pages)

Once loaded, the first instance is charged `backend.memory_bytes()` when the backend has it.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Protocol

GIB = 1024**3
MIN_OVERHEAD = 32 * 1024**2  # compute buffers, logits, tokenizer tables

# bytes per element of a KV cache type (block-quantized types include their scales)
_KV_ELEM_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q5_1": 24 / 32, "q5_0": 22 / 32,
                  "q4_1": 20 / 32, "q4_0": 18 / 32, "fp32": 4.0, "fp16": 2.0, "fp8": 1.0 + 4 / 256}

# GGUF scalar value types: type id -> struct format
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class Estimate:
    weights: int
    kv: int
    overhead: int

    @property
    def first(self) -> int:
        """Bytes for the first instance of the model."""
        return self.weights + self.kv + self.overhead

    @property
    def extra(self) -> int:
        """Bytes for each further instance (weights shared through mmap)."""
        return self.kv + self.overhead


ZERO = Estimate(0, 0, 0)


def gguf_scalars(path: Path) -> dict[str, Any]:
    """The GGUF header's scalar and string metadata (arrays are skipped, their length kept)."""
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        if m[:4] != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        version, _n_tensors, n_kv = struct.unpack_from("<IQQ", m, 4)
        if version < 2:
            raise ValueError(f"{path}: GGUF version {version} is not supported")
        pos = 24
        out: dict[str, Any] = {}
        for _ in range(n_kv):
            key, pos = _string(m, pos)
            (vtype,) = struct.unpack_from("<I", m, pos)
            value, pos = _value(m, pos + 4, vtype)
            out[key] = value
        return out


def _string(m: Any, pos: int) -> tuple[str, int]:
    (n,) = struct.unpack_from("<Q", m, pos)
    return bytes(m[pos + 8 : pos + 8 + n]).decode("utf-8", "replace"), pos + 8 + n


def _value(m: Any, pos: int, vtype: int) -> tuple[Any, int]:
    if vtype in _SCALARS:
        fmt = _SCALARS[vtype]
        return struct.unpack_from(fmt, m, pos)[0], pos + struct.calcsize(fmt)
    if vtype == _STRING:
        return _string(m, pos)
    if vtype == _ARRAY:
        etype, count = struct.unpack_from("<IQ", m, pos)
        pos += 12
        if etype in _SCALARS:
            return count, pos + count * struct.calcsize(_SCALARS[etype])
        for _ in range(count):  # strings or nested arrays: walk them, keep only the count
            _, pos = _value(m, pos, etype)
        return count, pos
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
    per_elem = _KV_ELEM_BYTES.get(kv_cache or "f16", 2.0)
    return int(n_ctx * layers * kv_heads * (k_len + v_len) * per_elem)


def file_kv_cache_bytes(path: Path, n_ctx: int, kv_cache: str | None) -> int:
    """kv_cache_bytes from a GGUF file's header; 0 if it cannot be read."""
    try:
        return kv_cache_bytes(gguf_scalars(path), n_ctx, kv_cache)
    except (ValueError, struct.error, OSError):
        return 0


def estimate_file(path: Path, n_ctx: int, kv_cache: str | None) -> Estimate:
    weights = path.stat().st_size
    try:
        kv = kv_cache_bytes(gguf_scalars(path), n_ctx, kv_cache)
    except (ValueError, struct.error, OSError):
        kv = 0  # not a readable GGUF: the load itself will fail and say why
    return Estimate(weights, kv, max(MIN_OVERHEAD, weights // 20))


def physical_memory() -> int:
    """RAM this process may use: physical pages, capped by a cgroup v2 memory.max."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            total = min(total, int(limit))
    except (OSError, ValueError):
        pass
    return total


def budget_bytes(setting: float | str) -> int:
    """pool.memory_budget_gb as bytes; "auto" = 80% of RAM."""
    if setting == "auto":
        return int(physical_memory() * 0.8)
    return int(float(setting) * GIB)


class Candidate(Protocol):
    """What eviction needs to know about a model (implemented by the pool's slots)."""

    @property
    def evictable(self) -> bool: ...

    @property
    def last_used(self) -> float: ...

    @property
    def held_bytes(self) -> int: ...


def choose_victims(
    others: Iterable[Candidate], *, models_held: int, max_loaded: int, used: int, need: int, budget: int
) -> list[Candidate] | None:
    """Least-recently-used idle models to evict so a load of `need` bytes fits both caps.

    `models_held` (the loading model included) and `used` count everything held or reserved now.
    Returns [] when it fits already, None when even evicting every idle model would not do.
    """
    victims: list[Candidate] = []
    idle = sorted((c for c in others if c.evictable), key=lambda c: c.last_used)
    for c in [None, *idle]:
        if c is not None:
            victims.append(c)
            models_held -= 1
            used -= c.held_bytes
        if models_held <= max_loaded and used + need <= budget:
            return victims
    return None
