"""llama.cpp's CPU numerics, for tests only (the engine's `matmul: int8` mode does the activation
quantization itself: capibara6/engine/weights.py, kernels qmatmul).

llama.cpp does not compute in fp32: before a dot product with a quantized weight it quantizes the
activations (Q8_0 blocks of 32 for Q4_0/Q5_0/Q8_0 weights, Q8_K blocks of 256 for k-quants), its
default KV cache is fp16 (flash attention casts even an F32 cache to fp16, llama-graph.cpp
build_attn_mha), and GELU comes from an fp16 table.

On Gemma 3 270M the activation quantization makes llama.cpp chaotic: the residual stream has
massive outlier channels, so many Q8 blocks are dominated by one value and the rest round to a few
levels; a 1e-6 relative change of the input flips roundings and moves a matmul's output by ~1e-3.
Any perturbation (flash attention on/off, F16 vs F32 KV, n_batch 1 vs 512) then ends at ~92% top-1
agreement and mean KL ~0.045 between two llama.cpp runs over PD_TEXT, and no implementation that
is not bit-identical to llama.cpp's exact code path can do better against it. The same model in
F32 weights (`write_f32_gguf`) is well conditioned: llama.cpp (F32 KV, no flash attention) and
our fp32 engine then agree at 100% top-1, KL ~3e-6, max |logit diff| ~0.1. That copy is the
reference that tests the graph; the quantized file can only be held to llama.cpp's own noise.
"""

from __future__ import annotations

import pathlib
from types import ModuleType

import numpy as np


def f16(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, np.float32).astype(np.float16).astype(np.float32)


class LlamaCppGelu:
    """Only llama.cpp's GELU (fp16 table lookup, exact outside [-10, 10]); all else as `base`.
    For F32 models with an F32 KV cache this is the one rounding llama.cpp adds."""

    def __init__(self, base: ModuleType) -> None:
        self._base = base

    def __getattr__(self, name: str) -> object:
        return getattr(self._base, name)

    def geglu(self, g: np.ndarray, u: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        gel = f16(self._base.gelu(f16(g)))
        res = np.where(g <= -10, 0, np.where(g >= 10, g, gel)).astype(np.float32) * u
        if out is not None:
            out[...] = res
            return out
        return res


def write_f32_gguf(src: str | pathlib.Path, dst: str | pathlib.Path) -> pathlib.Path:
    """Copy GGUF `src` to `dst` with every tensor dequantized to F32 (same metadata, same values).
    llama.cpp runs it without activation quantization: the deterministic reference for the graph.
    Gemma 3 270M gives a 1.1 GB file in about 20 s."""
    import gguf

    reader = gguf.GGUFReader(str(src))
    writer = gguf.GGUFWriter(str(dst), reader.fields["general.architecture"].contents())
    for name, f in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue  # written by the writer itself
        if name == "general.file_type":
            writer.add_uint32(name, 0)  # LLAMA_FTYPE_ALL_F32
            continue
        vt = f.types[0]
        sub = f.types[-1] if vt == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, f.contents(), vt, sub_type=sub)
    for t in reader.tensors:
        arr = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        arr = arr.reshape(tuple(int(n) for n in reversed(t.shape.tolist())))  # GGUF ne -> numpy order
        writer.add_tensor(t.name, arr, raw_dtype=gguf.GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return pathlib.Path(dst)
