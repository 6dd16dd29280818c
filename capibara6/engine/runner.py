"""Runs a loaded GGUF model: chunked prefill (GEMM), one-token decode (GEMV), prefix reuse.

The runner owns one sequence: `tokens` is what its KV cache holds. `prefill` keeps the longest
common prefix of the previous sequence and evaluates only the rest, so a follow-up chat turn
does not recompute the conversation so far.
"""

from __future__ import annotations

import pathlib
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import TypeVar

import numpy as np

from .gguf_loader import GGUFModel, load_gguf
from .graph_gemma3 import Gemma3Graph
from .graph_llama import LlamaGraph
from .kv_cache import KVCache
from .ops import load_ops, ops_name
from .sampler import Sampler, SampleResult
from .weights import MATMUL_MODES, QWeight

GRAPHS: dict[str, type[LlamaGraph]] = {"llama": LlamaGraph, "qwen2": LlamaGraph, "gemma3": Gemma3Graph}


@dataclass(frozen=True)
class Step:
    """One generated token with the logits it was sampled from (callers may inspect them)."""

    sample: SampleResult
    logits: np.ndarray


_R = TypeVar("_R", bound="ModelRun")


class ModelRun:
    """What the single-sequence Runner and the BatchRunner share: the model, its graph, the ops
    and the threads of the calling thread's forward passes."""

    def __init__(self, model: GGUFModel, ops: str | ModuleType, matmul: str, n_threads: int) -> None:
        """matmul: activations for block-quantized weights: "int16" (~fp32), "int8" (llama.cpp's
        arithmetic); "fp32" is a load mode (`load`: every weight dequantized)."""
        if matmul not in MATMUL_MODES:
            raise ValueError(f"matmul must be one of {tuple(MATMUL_MODES)}, got {matmul!r}")
        if matmul == "fp32" and any(isinstance(w, QWeight) for w in model.tensors.values()):
            raise ValueError("matmul='fp32' needs every weight dequantized: load_gguf(path, weights='fp32') "
                             "(Runner.load does it)")
        self.ops = load_ops(ops) if isinstance(ops, str) else ops
        self.n_threads = max(1, n_threads)  # applied per forward pass, in the calling thread
        self.model = model
        self.config = model.config
        self.graph = GRAPHS[self.config.arch](model, self.ops, matmul)

    @classmethod
    def load(cls: type[_R], path: str | pathlib.Path, **kwargs: object) -> _R:
        weights = "fp32" if kwargs.get("matmul") == "fp32" else "quantized"
        return cls(load_gguf(path, weights=weights), **kwargs)  # type: ignore[arg-type]

    @property
    def ops_name(self) -> str:
        return ops_name(self.ops)

    @property
    def n_vocab(self) -> int:
        return self.config.n_vocab


class Runner(ModelRun):
    def __init__(
        self,
        model: GGUFModel,
        *,
        n_ctx: int = 2048,
        kv_cache: str = "fp32",
        prefill_chunk: int = 256,
        n_threads: int = 1,
        ops: str | ModuleType = "auto",
        matmul: str = "int16",
    ) -> None:
        super().__init__(model, ops, matmul, n_threads)
        self.n_ctx = n_ctx
        self.prefill_chunk = max(1, prefill_chunk)
        c = self.config
        self.kv = KVCache(
            self.ops,
            n_layer=c.n_layer,
            n_ctx=n_ctx,
            n_head_kv=c.n_head_kv,
            head_dim_k=c.head_dim_k,
            head_dim_v=c.head_dim_v,
            dtype=kv_cache,
            windows=tuple(self.graph.window(il) for il in range(c.n_layer)),
            max_chunk=self.prefill_chunk,
        )
        self.tokens: list[int] = []

    def reset(self) -> None:
        self.tokens = []

    def memory_bytes(self) -> int:
        return self.model.weight_bytes + self.kv.nbytes()

    def forward(self, tokens: Sequence[int], all_logits: bool = False) -> np.ndarray:
        """Evaluate `tokens` after what the cache holds. Logits [T, vocab] if all_logits, else
        [vocab] for the last token (the vocab projection then runs for one row per chunk only)."""
        toks = np.asarray(tokens, dtype=np.int64)
        if toks.size == 0:
            raise ValueError("forward needs at least one token")
        self.ops.use_threads(self.n_threads)  # this thread's share (other models keep theirs)
        n_past = len(self.tokens)
        if n_past + toks.size > self.n_ctx:
            raise ValueError(f"sequence of {n_past + toks.size} tokens exceeds n_ctx={self.n_ctx}")
        self.kv.reserve(n_past + toks.size)
        outs: list[np.ndarray] = []
        for s in range(0, toks.size, self.prefill_chunk):
            chunk = toks[s : s + self.prefill_chunk]
            last_chunk = s + self.prefill_chunk >= toks.size
            want = "all" if all_logits else ("last" if last_chunk else "none")
            logits = self.graph.forward(chunk, len(self.tokens), self.kv, want)
            self.tokens.extend(int(t) for t in chunk)
            if logits is not None:
                outs.append(logits)
        if all_logits:
            return np.concatenate(outs, axis=0) if len(outs) > 1 else outs[0]
        return outs[-1][-1]

    def hidden_states(self, tokens: Sequence[int]) -> np.ndarray:
        """The sequence `tokens` alone (the cache is started afresh), evaluated in prefill chunks;
        its final hidden states after the output norm [T, n_embd], no vocab projection (embeddings).
        The cache then holds `tokens`, so a later prefill may reuse them as a prefix."""
        toks = np.asarray(tokens, dtype=np.int64)
        if toks.size == 0:
            raise ValueError("hidden_states needs at least one token")
        if toks.size > self.n_ctx:
            raise ValueError(f"sequence of {toks.size} tokens exceeds n_ctx={self.n_ctx}")
        self.ops.use_threads(self.n_threads)
        self.tokens = []
        self.kv.reserve(toks.size)
        outs: list[np.ndarray] = []
        for s in range(0, toks.size, self.prefill_chunk):
            chunk = toks[s : s + self.prefill_chunk]
            h = self.graph.forward(chunk, len(self.tokens), self.kv, "hidden")
            assert h is not None
            outs.append(h)
            self.tokens.extend(int(t) for t in chunk)
        return np.concatenate(outs, axis=0) if len(outs) > 1 else outs[0]

    def prefill(self, prompt: Sequence[int]) -> np.ndarray:
        """Make the cache hold exactly `prompt`, reusing the common prefix; logits [vocab] of its last token."""
        prompt = list(prompt)
        if not prompt:
            raise ValueError("prefill needs at least one token")
        n = 0
        for a, b in zip(self.tokens, prompt):
            if a != b:
                break
            n += 1
        n = min(n, len(prompt) - 1)  # always re-run the last prompt token to get its logits
        n = self.kv.reusable_prefix(len(self.tokens), n)  # sliding-window rings forget old rows
        self.tokens = self.tokens[:n]
        return self.forward(prompt[n:])

    def generate(
        self,
        prompt: Sequence[int],
        sampler: Sampler,
        max_tokens: int,
        stop_ids: frozenset[int] = frozenset(),
        cancel: threading.Event | None = None,
    ) -> Iterator[Step]:
        """Yield sampled tokens until max_tokens or a token in stop_ids (which is yielded too)."""
        logits = self.prefill(prompt)
        for i in range(max_tokens):
            if cancel is not None and cancel.is_set():
                return
            res = sampler.sample(logits, self.tokens)
            yield Step(res, logits)
            if res.token in stop_ids or i == max_tokens - 1:
                return
            if cancel is not None and cancel.is_set():
                return
            logits = self.forward([res.token])
