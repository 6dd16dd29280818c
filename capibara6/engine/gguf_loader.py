"""Reads a GGUF file: hyper-parameters from its metadata, and the weights.

weights="quantized" (default): matrices in a type `kernels.qmatmul` multiplies (Q4_0, Q5_0, Q8_0,
Q4_K, Q5_K, Q6_K) stay memory-mapped views of the file in their block format (`QWeight`); the
rest is dequantized to fp32. weights="fp32": everything is dequantized once at load (the
reference path, and where the resident memory goes).
"""

from __future__ import annotations

import math
import pathlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .dequant import dequantize
from .errors import UnsupportedModel
from .gguf_file import GGUFFile
from .weights import MATMUL_TYPES, QWeight, Weight

SUPPORTED_ARCHS = ("llama", "qwen2", "gemma3")


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    n_vocab: int
    n_embd: int
    n_layer: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim_k: int
    head_dim_v: int
    rms_eps: float
    rope_base: float
    rope_freq_scale: float
    rope_dim: int
    rope_mode: str  # "normal" | "neox"
    n_ctx_train: int
    attn_scale: float
    sliding_window: int = 0  # 0: none
    swa_layers: tuple[bool, ...] = ()  # per layer: True -> sliding-window attention
    rope_base_swa: float = 10000.0
    final_logit_softcap: float = 0.0
    bos_id: int | None = None
    eos_id: int | None = None
    extra_eos: tuple[int, ...] = field(default_factory=tuple)


def read_config(meta: dict[str, Any]) -> ModelConfig:
    """Hyper-parameters from GGUF metadata (keys as llama.cpp names them)."""

    def _field(key: str, default: Any = None) -> Any:
        v = meta.get(key, default)
        return default if v is None else v

    arch = str(_field("general.architecture"))
    if arch not in SUPPORTED_ARCHS:
        raise UnsupportedModel(f"architecture {arch!r} is not supported (have {SUPPORTED_ARCHS})")

    def a(key: str, default: Any = None) -> Any:
        return _field(f"{arch}.{key}", default)

    n_embd = int(a("embedding_length"))
    n_head = int(a("attention.head_count"))
    n_head_kv = int(a("attention.head_count_kv", n_head))
    head_dim_k = int(a("attention.key_length", n_embd // n_head))
    head_dim_v = int(a("attention.value_length", head_dim_k))
    n_layer = int(a("block_count"))
    n_vocab = int(a("vocab_size", len(meta["tokenizer.ggml.tokens"])))
    scaling_type = a("rope.scaling.type", "none")
    scale_factor = float(a("rope.scaling.factor", 1.0) or 1.0)
    freq_scale = 1.0 / scale_factor if scaling_type == "linear" else 1.0
    if scaling_type not in ("none", "linear", None):
        raise UnsupportedModel(f"rope scaling {scaling_type!r} is not supported")

    swa = 0
    swa_layers: tuple[bool, ...] = tuple(False for _ in range(n_layer))
    attn_scale = 1.0 / math.sqrt(head_dim_k)
    softcap = 0.0
    if arch == "gemma3":
        swa = int(a("attention.sliding_window", 0) or 0)
        if swa > 0:
            # llama.cpp set_swa_pattern(6): layers with il % 6 < 5 are local, every 6th is global.
            swa_layers = tuple(il % 6 < 5 for il in range(n_layer))
        # llama.cpp (after gemma_pytorch config): 27B scales by d_model/n_head, others by head_dim.
        if n_layer == 62:
            attn_scale = 1.0 / math.sqrt(n_embd / n_head)
        softcap = float(a("final_logit_softcapping", 0.0) or 0.0)

    eos = _field("tokenizer.ggml.eos_token_id")
    eot = _field("tokenizer.ggml.eot_token_id")
    bos = _field("tokenizer.ggml.bos_token_id")
    return ModelConfig(
        arch=arch,
        n_vocab=n_vocab,
        n_embd=n_embd,
        n_layer=n_layer,
        n_ff=int(a("feed_forward_length")),
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim_k=head_dim_k,
        head_dim_v=head_dim_v,
        rms_eps=float(a("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_base=float(a("rope.freq_base", 10000.0)),
        rope_freq_scale=freq_scale,
        rope_dim=int(a("rope.dimension_count", head_dim_k)),
        # llama.cpp: LLAMA_ROPE_TYPE_NORM for llama, NEOX for qwen2 and the gemma family.
        rope_mode="normal" if arch == "llama" else "neox",
        n_ctx_train=int(a("context_length", 2048)),
        attn_scale=attn_scale,
        sliding_window=swa,
        swa_layers=swa_layers,
        final_logit_softcap=softcap,
        bos_id=None if bos is None else int(bos),
        eos_id=None if eos is None else int(eos),
        extra_eos=() if eot is None else (int(eot),),
    )


@dataclass
class GGUFModel:
    path: pathlib.Path
    config: ModelConfig
    tensors: dict[str, Weight]
    owned_bytes: int  # dequantized copies (anonymous memory)
    mapped_bytes: int  # tensors left as views of the memory-mapped file (F32, or QWeight blocks)
    file_types: dict[str, str] = field(default_factory=dict)  # tensor name -> GGUF type as stored

    def get(self, name: str) -> Weight | None:
        return self.tensors.get(name)

    def __getitem__(self, name: str) -> Weight:
        return self.tensors[name]

    def vector(self, name: str) -> np.ndarray:
        """A 1-D fp32 parameter (norm weights, biases): never kept quantized."""
        v = self.tensors[name]
        assert isinstance(v, np.ndarray), name
        return v

    @property
    def weight_bytes(self) -> int:
        return self.owned_bytes + self.mapped_bytes


WEIGHT_MODES = ("quantized", "fp32")


def load_gguf(path: str | pathlib.Path, weights: str = "quantized") -> GGUFModel:
    """Quantized matrices of a supported type stay mapped as QWeight (weights="quantized").
    F32 tensors stay views of the mapping when they are most of the file (an F32 model); when the
    file is mostly quantized and everything is dequantized, they are copied too so the mapping
    (whose pages dequantization touched and would keep resident) is released once loading ends."""
    if weights not in WEIGHT_MODES:
        raise ValueError(f"weights must be one of {WEIGHT_MODES}, got {weights!r}")
    path = pathlib.Path(path)
    reader = GGUFFile(path)
    config = read_config(reader.metadata)
    keep = weights == "quantized"
    f32_bytes = sum(int(t.n_bytes) for t in reader.tensors if t.tensor_type.name == "F32")
    keep_mapped = keep or f32_bytes * 2 >= sum(int(t.n_bytes) for t in reader.tensors)
    tensors: dict[str, Weight] = {}
    types: dict[str, str] = {}
    owned = mapped = 0
    for t in reader.tensors:
        types[t.name] = t.tensor_type.name
        if keep and t.tensor_type in MATMUL_TYPES and t.data.ndim == 2:
            tensors[t.name] = QWeight(t.data, t.tensor_type)
            mapped += int(t.data.nbytes)
            continue
        arr = dequantize(t.data, t.tensor_type)
        if np.shares_memory(arr, t.data):
            if keep_mapped:
                mapped += arr.nbytes
            else:
                arr = arr.copy()
                owned += arr.nbytes
        else:
            owned += arr.nbytes
        tensors[t.name] = arr
    del reader, t  # with nothing mapped left, this closes the file mapping
    return GGUFModel(path=path, config=config, tensors=tensors, owned_bytes=owned, mapped_bytes=mapped, file_types=types)
