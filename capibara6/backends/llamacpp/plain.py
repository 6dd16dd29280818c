"""llama-cpp-python backend: GGUF models through llama.cpp (the production path).

Generation drives `Llama.generate` (llama.cpp's sampler chain in C, prefix reuse of the KV cache
between calls) and adds what the high-level API lacks: per-request seeds, stop strings that never
leak, cancellation between tokens, and logprobs without `logits_all=True` (which would keep
n_ctx x vocab floats: ~4 GB for Gemma's 262k vocab at n_ctx 4096). After each decode llama.cpp
holds the last position's logits, which are exactly the distribution the token was sampled from.

State-space and hybrid models (`recurrent`): llama.cpp keeps one state summarising every token
fed, which cannot be cut back. Llama.generate's prefix reuse asks llama.cpp to drop positions from
`len(prefix)` on, and for a state whose last position IS that one llama.cpp clears the whole state
and reports success (a repeated prompt after a one-token answer would then decode its last token
from an empty state). So a recurrent model reuses its state only when the new prompt strictly
extends every token already fed (a continued conversation); otherwise it starts from scratch.
"""

from __future__ import annotations

import gc
import random
import threading
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np

from ...chat_templates import Formatter, get_formatter, jinja_formatter
from ...engine.grammar import Grammar
from ...engine.sampler import Sampler
from ...gguf_header import estimate_file, file_kv_cache_bytes
from ...llama_load import new_llama
from ...threads import resolve_threads
from ...types import (
    BackendError,
    Capabilities,
    ChatPrompt,
    ContextLengthExceeded,
    Estimate,
    GenerationOutcome,
    InvalidPrompt,
    Pooling,
    Prepared,
    Prompt,
    SamplingParams,
    TextPrompt,
    TokenEvent,
)
from ..checks import check_logit_bias, check_token_ids
from ..pooling import check_inputs, normalized
from ..stops import StopText
from .constrained import Constrained

if TYPE_CHECKING:
    from ...config import ModelSpec

CAPABILITIES = Capabilities()  # llama.cpp honours every sampling field we expose

_POOLING = {"mean": 1, "cls": 2, "last": 3}  # llama.cpp's LLAMA_POOLING_TYPE_*
EMBED_SEQ_MAX = 64  # inputs per llama_decode in the embedding context (tokens: up to n_ctx)

_KV_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8}


def _kv_kwargs(kv_cache: str | None) -> dict[str, Any]:
    if kv_cache is None or kv_cache == "f16":
        return {}
    if kv_cache not in _KV_TYPES:
        raise ValueError(f"kv_cache {kv_cache!r} is not one of {sorted(_KV_TYPES)} for backend llamacpp")
    # a quantized V cache needs flash attention in llama.cpp
    return {"type_k": _KV_TYPES[kv_cache], "type_v": _KV_TYPES[kv_cache], "flash_attn": True}


def _only_processor(constrained: Constrained) -> Any:
    """A grammar for Llama.generate: our few-candidate constrained pick (see Constrained) decides
    the token, and every other logit becomes -inf, so llama.cpp's chain can only take it.
    (LlamaGrammar in the chain masks the whole vocabulary each step: 0.2x decode on Gemma.)"""
    from llama_cpp import LogitsProcessorList

    def only(_input_ids: Any, scores: np.ndarray) -> np.ndarray:
        token = constrained.sample(scores)
        out = np.full_like(scores, -np.inf)
        out[token] = 0.0
        return out

    return LogitsProcessorList([only])


def _bias_processor(bias: tuple[tuple[int, float], ...]) -> Any:
    """logit_bias for Llama.generate: added to the raw logits before the sampler chain runs."""
    if not bias:
        return None
    from llama_cpp import LogitsProcessorList

    ids = np.array([i for i, _ in bias], dtype=np.int64)
    values = np.array([b for _, b in bias], dtype=np.float32)

    def add(_input_ids: Any, scores: np.ndarray) -> np.ndarray:
        scores[ids] += values
        return scores

    return LogitsProcessorList([add])


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
    def __init__(
        self, model_id: str, llm: Any, formatter: Formatter, path: Path, kv_type: str | None = None, n_threads: int = 1
    ) -> None:
        self.model_id = model_id
        self._n_threads = n_threads
        self.llm = llm
        self.n_ctx: int = llm.n_ctx()
        self._formatter = formatter
        self._path = path
        self._n_vocab: int = llm.n_vocab()
        self._kv_type = kv_type
        self._kv_bytes: int | None = None
        self._embed: _EmbedContext | None = None  # made at the first embed call, kept until close
        self._embed_lock = threading.Lock()  # a batching instance serves several leases at once
        self.embed_batch: int = int(llm.n_batch)  # most tokens of packed inputs per embedding decode
        arch = llm.metadata.get("general.architecture", "")
        # BERT-like GGUFs say `<arch>.attention.causal: false`: an encoder embeds, it cannot generate
        self.encoder_only = str(llm.metadata.get(f"{arch}.attention.causal", "true")).lower() == "false"
        self.recurrent = _is_recurrent(llm)  # SSM / RWKV / hybrid: a per-sequence state (docs/ssm.md)

    # -- class side (backends/base.py BackendClass) --------------------------------------------

    @classmethod
    def capabilities(cls, spec: ModelSpec) -> Capabilities:
        return replace(CAPABILITIES, embeddings=spec.embedding is not None)

    @classmethod
    def max_concurrency(cls, spec: ModelSpec) -> int:
        return 1  # one context, one sequence: `parallel` > 1 picks the batched class instead

    @classmethod
    def threads(cls, spec: ModelSpec) -> int:
        """`parallel` instances generate at once, so they split the inference CPUs."""
        return resolve_threads(spec.n_threads, concurrent=spec.parallel)

    @classmethod
    def estimate(cls, spec: ModelSpec, path: Path | None) -> Estimate:
        assert path is not None
        return estimate_file(path, spec.n_ctx, spec.kv_cache)

    @classmethod
    def load(cls, model_id: str, spec: ModelSpec, path: Path | None, n_threads: int) -> LlamaCppBackend:
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
        return cls(model_id, llm, cls._pick_formatter(llm, spec.chat_format, spec.embedding is not None), path, spec.kv_cache, n_threads)

    @staticmethod
    def _pick_formatter(llm: Any, name: str | None, embeds: bool = False) -> Formatter:
        """The named format, else the GGUF's template; an embedding model without either (BERT,
        nomic-bert) loads anyway and refuses chat requests."""
        if name:
            return get_formatter(name)
        template = llm.metadata.get("tokenizer.chat_template")
        if not template and embeds:
            return _no_chat
        if not template:
            raise ValueError("no chat_format given and the GGUF has no chat template")
        bos = llm.detokenize([llm.token_bos()], special=True).decode("utf-8", "replace")
        eos = llm.detokenize([llm.token_eos()], special=True).decode("utf-8", "replace")
        return jinja_formatter(template, bos, eos)

    # -- instance side (backends/base.py Backend) ----------------------------------------------

    def tokenize(self, text: str, *, add_bos: bool = True) -> list[int]:
        """Special tokens in `text` (chat markup) are parsed as such."""
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True))

    def detokenize(self, ids: Sequence[int]) -> str:
        return str(self.llm.detokenize(list(ids), special=False).decode("utf-8", "replace"))

    def prepare(self, prompt: Prompt) -> Prepared:
        """Chat: the named (or the GGUF's) template, then tokens; text: tokens; ids: checked."""
        if isinstance(prompt, ChatPrompt):
            text, stops = self._formatter(list(prompt.messages), prompt.tools)
            tokens = self.tokenize(text)
            return Prepared(prompt, tuple(tokens), len(tokens), stops, text)
        if isinstance(prompt, TextPrompt):
            tokens = self.tokenize(prompt.text)
            return Prepared(prompt, tuple(tokens), len(tokens), (), prompt.text)
        check_token_ids(prompt.ids, self._n_vocab)
        return Prepared(prompt, prompt.ids, len(prompt.ids))

    def embed(
        self, prepared: Sequence[Prepared], pooling: Pooling, normalize: bool, cancel: threading.Event | None = None
    ) -> list[np.ndarray]:
        """Through a second llama.cpp context on the same model (embeddings on, llama.cpp pooling),
        made once: many inputs per llama_decode, each its own sequence (see _EmbedContext)."""
        inputs = check_inputs(prepared, self.n_ctx)
        with self._embed_lock:
            if self._embed is None or self._embed.pooling != pooling:
                if self._embed is not None:
                    self._embed.close()
                self._embed = _EmbedContext(self.llm, self.n_ctx, pooling, self._n_threads, self.embed_batch)
            out = self._embed.run(inputs, cancel)
        return [normalized(v) for v in out] if normalize else out

    def set_threads(self, n_threads: int) -> None:
        """Change the thread count between generations (consensus splits the CPUs)."""
        import llama_cpp

        llama_cpp.llama_set_n_threads(self.llm.ctx, n_threads, n_threads)
        self._n_threads = n_threads

    def current_threads(self) -> int | None:
        return self._n_threads

    def generate(
        self, prepared: Prepared, params: SamplingParams, outcome: GenerationOutcome, cancel: threading.Event
    ) -> Iterator[TokenEvent]:
        tokens = self.prompt_tokens(prepared, params, outcome)
        return self._run(tokens, params, outcome, cancel)

    def prompt_tokens(self, prepared: Prepared, params: SamplingParams, outcome: GenerationOutcome) -> list[int]:
        """The prompt's tokens, checked against the context before anything runs."""
        if self.encoder_only:
            raise BackendError(f"Model '{self.model_id}' is an encoder (non-causal attention): it serves "
                               "/v1/embeddings only, not generation.", param="model")
        tokens = list(prepared.tokens or ())
        if not tokens:
            raise InvalidPrompt("the prompt is empty")
        check_logit_bias(params.logit_bias, self._n_vocab)
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
        constrained = None
        processor = _bias_processor(params.logit_bias)
        if params.grammar:
            constrained = Constrained(Sampler.from_params(params, Grammar(llm._model.vocab, self._n_vocab, params.grammar)))
            processor = _only_processor(constrained)
        text = StopText(params.stop)
        vocab = llm._model.vocab
        if self.recurrent and not _extends_state(llm, tokens):
            llm.reset()  # clears the state: generate() then feeds the whole prompt
        gen = llm.generate(
            tokens,
            top_k=params.top_k,
            top_p=params.top_p,
            min_p=params.min_p,
            temp=params.temperature,
            repeat_penalty=params.repeat_penalty,
            frequency_penalty=params.frequency_penalty,
            presence_penalty=params.presence_penalty,
            logits_processor=processor,
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
            if constrained is not None:
                constrained.close()

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
            self._kv_bytes = file_kv_cache_bytes(self._path, self.n_ctx, self._kv_type)
        return self._kv_bytes

    def memory_bytes(self) -> int:
        return self._path.stat().st_size + self.kv_cache_bytes()

    def close(self) -> None:
        with self._embed_lock:
            if self._embed is not None:
                self._embed.close()
                self._embed = None
        self.llm.close()
        self.llm = None
        gc.collect()


def _is_recurrent(llm: Any) -> bool:
    import llama_cpp

    model = llm._model.model
    return bool(llama_cpp.llama_model_is_recurrent(model) or llama_cpp.llama_model_is_hybrid(model))


def _extends_state(llm: Any, tokens: Sequence[int]) -> bool:
    """The prompt starts with every token fed so far and adds at least one: the state is reusable."""
    n = int(llm.n_tokens)
    return 0 < n < len(tokens) and [int(t) for t in llm._input_ids[:n]] == list(tokens[:n])


def _no_chat(messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] = ()) -> tuple[str, tuple[str, ...]]:
    raise InvalidPrompt("this model has no chat template (it is registered for embeddings): send `prompt` "
                        "to /v1/completions or `input` to /v1/embeddings", param="messages")


class _EmbedContext:
    """A llama.cpp context with embeddings on and pooling in the graph, sharing the generation
    context's model (weights loaded once). The KV cache is unified (`kv_unified`): up to
    EMBED_SEQ_MAX inputs, together at most `pack_tokens` (the entry's n_batch) tokens, go into one
    llama_decode as sequences
    0..k-1, and llama_get_embeddings_seq gives each one's pooled vector. n_ubatch = n_ctx because
    llama.cpp pools a sequence within one micro-batch (a longer input decodes alone), so every
    input that fits the context fits.

    Memory: llama.cpp's embedding mode on a decoder model still runs the LM head for every token
    and keeps the rows (n_tokens x n_vocab floats per decode: 512 MB for Gemma's 262k vocabulary
    at 512 tokens, and about half of the compute); packing at most n_batch tokens bounds that for
    many short inputs. A dedicated embedding GGUF (BERT-like: no LM head) computes no logits."""

    def __init__(self, llm: Any, n_ctx: int, pooling: Pooling, n_threads: int, pack_tokens: int) -> None:
        import llama_cpp
        from llama_cpp import _internals

        p = llama_cpp.llama_context_default_params()
        p.n_ctx = n_ctx
        p.n_batch = p.n_ubatch = n_ctx
        p.n_seq_max = min(EMBED_SEQ_MAX, llama_cpp.llama_max_parallel_sequences())
        p.kv_unified = True
        p.embeddings = True
        p.pooling_type = _POOLING[pooling]
        p.n_threads = p.n_threads_batch = n_threads
        self.pooling = pooling
        self.n_ctx = n_ctx
        self.pack_tokens = max(1, min(n_ctx, pack_tokens))
        self.n_seq_max = int(p.n_seq_max)
        self.n_embd: int = llm.n_embd()
        self.ctx = _internals.LlamaContext(model=llm._model, params=p, verbose=False)
        self.batch = _internals.LlamaBatch(n_tokens=n_ctx, embd=0, n_seq_max=self.n_seq_max, verbose=False)

    def run(self, inputs: list[list[int]], cancel: threading.Event | None) -> list[np.ndarray]:
        """inputs (each <= n_ctx tokens) -> pooled vectors [n_embd], packed greedily in order."""
        out: list[np.ndarray] = []
        group: list[list[int]] = []
        n = 0
        for ids in inputs:
            if group and (n + len(ids) > self.pack_tokens or len(group) >= self.n_seq_max):
                out += self._decode(group)
                group, n = [], 0
                if cancel is not None and cancel.is_set():
                    return out
            group.append(ids)
            n += len(ids)
        if group:
            out += self._decode(group)
        return out

    def _decode(self, group: list[list[int]]) -> list[np.ndarray]:
        import llama_cpp

        self.ctx.kv_cache_clear()
        self.batch.reset()
        for seq, ids in enumerate(group):
            self.batch.add_sequence(ids, seq, True)  # every token an output: pooling reads them all
        self.ctx.decode(self.batch)
        vecs = []
        for seq in range(len(group)):
            ptr = llama_cpp.llama_get_embeddings_seq(self.ctx.ctx, seq)
            if not ptr:
                raise RuntimeError("llama.cpp returned no pooled embedding")
            vecs.append(np.ctypeslib.as_array(ptr, shape=(self.n_embd,)).astype(np.float32))
        self.ctx.kv_cache_clear()
        return vecs

    def close(self) -> None:
        self.batch.close()
        self.ctx.close()
