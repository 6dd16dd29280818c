"""llama-cpp-python backend: GGUF models through llama.cpp (the production path).

Generation drives `Llama.generate` (llama.cpp's sampler chain in C, prefix reuse of the KV cache
between calls) and adds what the high-level API lacks: per-request seeds, stop strings that never
leak, cancellation between tokens, and logprobs without `logits_all=True` (which would keep
n_ctx x vocab floats: ~4 GB for Gemma's 262k vocab at n_ctx 4096). After each decode llama.cpp
holds the last position's logits, which are exactly the distribution the token was sampled from.
"""

from __future__ import annotations

import gc
import random
import threading
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from .base import ContextLengthExceeded, GenerationOutcome, SamplingParams, TokenEvent
from .llama_load import new_llama
from .stops import StopText
from ..chat_templates import Formatter, get_formatter, jinja_formatter

_KV_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8}


def _kv_kwargs(kv_cache: str | None) -> dict[str, Any]:
    if kv_cache is None or kv_cache == "f16":
        return {}
    if kv_cache not in _KV_TYPES:
        raise ValueError(f"kv_cache {kv_cache!r} is not one of {sorted(_KV_TYPES)} for backend llamacpp")
    # a quantized V cache needs flash attention in llama.cpp
    return {"type_k": _KV_TYPES[kv_cache], "type_v": _KV_TYPES[kv_cache], "flash_attn": True}


def token_logprobs(logits: np.ndarray, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """Log-softmax at `token` and the k most likely (id, logprob), best first. logits: (n_vocab,)."""
    m = float(logits.max())
    lse = m + float(np.log(np.exp(logits - m, dtype=np.float32).sum(dtype=np.float64)))
    top: list[tuple[int, float]] = []
    if k > 0:
        ids = np.argpartition(logits, -k)[-k:]
        top = [(int(i), float(logits[i]) - lse) for i in ids[np.argsort(-logits[ids])]]
    return float(logits[token]) - lse, top


class LlamaCppBackend:
    def __init__(self, model_id: str, llm: Any, formatter: Formatter, path: Path, kv_type: str | None = None) -> None:
        self.model_id = model_id
        self.llm = llm
        self.n_ctx: int = llm.n_ctx()
        self._formatter = formatter
        self._path = path
        self._n_vocab: int = llm.n_vocab()
        self._kv_type = kv_type
        self._kv_bytes: int | None = None

    @classmethod
    def load(cls, model_id: str, path: Path | None, spec: Any, n_threads: int) -> "LlamaCppBackend":
        assert path is not None
        llm = new_llama(
            model_path=str(path),
            n_ctx=spec.n_ctx,
            n_batch=min(spec.n_batch, spec.n_ctx),
            n_threads=n_threads,
            n_threads_batch=n_threads,
            logits_all=False,
            verbose=False,
            **_kv_kwargs(spec.kv_cache),
        )
        return cls(model_id, llm, cls._pick_formatter(llm, spec.chat_format), path, spec.kv_cache)

    @staticmethod
    def _pick_formatter(llm: Any, name: str | None) -> Formatter:
        if name:
            return get_formatter(name)
        template = llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise ValueError("no chat_format given and the GGUF has no chat template")
        bos = llm.detokenize([llm.token_bos()], special=True).decode("utf-8", "replace")
        eos = llm.detokenize([llm.token_eos()], special=True).decode("utf-8", "replace")
        return jinja_formatter(template, bos, eos)

    # -- Backend protocol ---------------------------------------------------------------------

    def tokenize(self, text: str, *, add_bos: bool = True) -> list[int]:
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True))

    def chat_prompt(self, messages: Sequence[dict[str, object]]) -> tuple[str, tuple[str, ...]]:
        return self._formatter(messages)

    def set_threads(self, n_threads: int) -> None:
        """Change the thread count between generations (consensus splits the CPUs)."""
        import llama_cpp

        llama_cpp.llama_set_n_threads(self.llm.ctx, n_threads, n_threads)

    def generate(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams,
        outcome: GenerationOutcome,
        cancel: threading.Event,
    ) -> Iterator[TokenEvent]:
        tokens = self.prompt_tokens(prompt, params, outcome)
        return self._run(tokens, params, outcome, cancel)

    def prompt_tokens(self, prompt: str | Sequence[int], params: SamplingParams, outcome: GenerationOutcome) -> list[int]:
        """The prompt as tokens, checked against the context before anything runs."""
        tokens = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        if not tokens:
            raise ValueError("the prompt is empty")
        if len(tokens) + params.max_tokens > self.n_ctx:
            raise ContextLengthExceeded(len(tokens), params.max_tokens, self.n_ctx)
        outcome.prompt_tokens = len(tokens)
        return tokens

    def _run(
        self, tokens: list[int], params: SamplingParams, outcome: GenerationOutcome, cancel: threading.Event
    ) -> Iterator[TokenEvent]:
        import llama_cpp

        llm = self.llm
        llm.set_seed(params.seed if params.seed is not None else random.getrandbits(31))
        grammar = None
        if params.grammar:
            from llama_cpp import LlamaGrammar

            grammar = LlamaGrammar.from_string(params.grammar, verbose=False)
        text = StopText(params.stop)
        vocab = llm._model.vocab
        gen = llm.generate(
            tokens,
            top_k=params.top_k,
            top_p=params.top_p,
            min_p=params.min_p,
            temp=params.temperature,
            repeat_penalty=params.repeat_penalty,
            frequency_penalty=params.frequency_penalty,
            presence_penalty=params.presence_penalty,
            grammar=grammar,
        )
        try:
            for token in gen:
                if cancel.is_set():
                    return
                if llama_cpp.llama_vocab_is_eog(vocab, token):
                    outcome.finish_reason = "stop"
                    break
                outcome.completion_tokens += 1
                raw = llm.detokenize([token], special=False)
                if params.logprobs is None:
                    yield TokenEvent(token, text.feed(raw))
                else:
                    lp, top = self._logprobs(token, params.logprobs)
                    yield TokenEvent(token, text.feed(raw), lp, top, raw.decode("utf-8", "replace"))
                if text.stopped:
                    outcome.finish_reason = "stop"
                    break
                if outcome.completion_tokens >= params.max_tokens:
                    outcome.finish_reason = "length"
                    break
            tail = text.flush()
            if tail:
                yield TokenEvent(-1, tail)
        finally:
            gen.close()

    def _logprobs(self, token: int, k: int) -> tuple[float, dict[str, float]]:
        """Log-softmax of the logits the token was sampled from (the last decoded position)."""
        import llama_cpp

        ptr = llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        lp, ranked = token_logprobs(np.ctypeslib.as_array(ptr, shape=(self._n_vocab,)), token, k)
        return lp, self.top_pieces(ranked)

    def top_pieces(self, ranked: list[tuple[int, float]]) -> dict[str, float]:
        """[(token id, logprob)] -> {token text: logprob} (OpenAI top_logprobs shape)."""
        return {self.llm.detokenize([i], special=False).decode("utf-8", "replace"): lp for i, lp in ranked}

    def kv_cache_bytes(self) -> int:
        """llama.cpp allocates K and V for every layer and all n_ctx cells at load."""
        if self._kv_bytes is None:
            from ..pool.budget import file_kv_cache_bytes

            self._kv_bytes = file_kv_cache_bytes(self._path, self.n_ctx, self._kv_type)
        return self._kv_bytes

    def memory_bytes(self) -> int:
        return self._path.stat().st_size + self.kv_cache_bytes()

    def close(self) -> None:
        self.llm.close()
        self.llm = None
        gc.collect()
