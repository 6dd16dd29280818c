"""llama.cpp with continuous batching: up to `parallel` generations share one context.

`LlamaCppBatchedBackend` is a Backend whose `generate()` may be called from several threads at
once (`max_concurrency = parallel`). Each call hands a `SeqState` to the model's `Scheduler`
(scheduler.py beside this file), whose thread owns the llama context and decodes every running sequence in
one `llama_decode` per step; the calling thread turns that sequence's token ids into text
(StopText), so detokenising never delays the step loop.

The native side (`LlamaDecoder`) is llama-cpp-python's low-level API: one context with
`n_seq_max = parallel` and a unified KV cache (sequences share the cells, so `seq_cp` of a cached
prefix shares cells instead of copying them), one reusable `llama_batch`, and one sampler chain
per sequence with its own parameters and seed. Greedy sequences without penalties, grammar or
logprobs skip the sampler chain: argmax of the logits row picks the same token (first maximum,
as llama.cpp's greedy sampler) without copying 262k candidates per token.

State-space and hybrid models (mamba, mamba2, rwkv6/7, falcon-h1, jamba, ...: llama.cpp's
`llama_model_is_recurrent` / `_is_hybrid`) keep one fixed-size state per sequence id instead of
KV cells (llama_memory_recurrent has n_seq_max cells, one per slot). A state holds ALL the tokens
fed so far and cannot be cut back to an earlier position (`llama_memory_seq_rm` with p0 > 0
fails), nor copied as a prefix. So for them the scheduler runs in `recurrent` mode (see
scheduler.py): a cached slot is reused only when its whole token history is a prefix of the new
prompt (a conversation continued), never trimmed, never `seq_cp`'d; preemption drops a state
whole and recomputes it, as for KV. A pure recurrent model has no shared cells at all, so its
cell budget is n_ctx per sequence (`n_cells = n_ctx x parallel`): nothing ever waits or is
preempted for KV room; a hybrid's attention layers share n_ctx KV cells as a transformer does.
"""

from __future__ import annotations

import random
import threading
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from ...engine.grammar import Grammar
from ...engine.sampler import Sampler
from ...gguf_header import estimate_file, file_kv_cache_bytes
from ...llama_load import new_llama
from ...threads import resolve_threads
from ...types import Estimate, GenerationOutcome, Prepared, SamplingParams, TokenEvent
from ..stops import StopText
from .constrained import Constrained
from .plain import LlamaCppBackend, _kv_kwargs, token_logprobs
from .scheduler import Scheduler, SeqState, read_tokens, submit_new

if TYPE_CHECKING:
    from collections.abc import Sequence as Seq

    from ...config import ModelSpec

_POLL_S = 0.05  # how often a reader waiting for its next token re-checks `cancel`
HELPER_N_CTX = 256  # the Llama object's own context (tokenizer, metadata): llama.cpp's smallest


class LlamaDecoder:
    """One llama context + batch for `n_seq` sequences (used by the scheduler thread only)."""

    def __init__(self, llm: Any, spec: Any, n_threads: int) -> None:
        import llama_cpp
        from llama_cpp._internals import LlamaContext

        self._lc = llama_cpp
        self._model = llm._model
        self._vocab = llm._model.vocab
        self.n_vocab: int = llm.n_vocab()
        n_seq = spec.parallel
        self.n_batch = spec.prefill_chunk + n_seq  # one step: a decode token per sequence + the prefill budget
        kv = _kv_kwargs(spec.kv_cache)
        p = llama_cpp.llama_context_default_params()
        p.n_ctx = spec.n_ctx
        p.n_batch = p.n_ubatch = self.n_batch  # one ubatch per step: one graph computation
        p.n_seq_max = n_seq
        p.n_outputs_max = n_seq  # logits rows per step: one per sequence (the default, n_batch, sizes 262k-vocab buffers for nothing)
        p.n_threads = p.n_threads_batch = n_threads
        p.kv_unified = True  # all sequences share the n_ctx cells (and prefix cells via seq_cp)
        p.swa_full = True  # SWA layers keep every position, so any cached prefix stays reusable
        p.no_perf = True
        p.flash_attn_type = (
            llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if kv.get("flash_attn") else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        if "type_k" in kv:
            p.type_k, p.type_v = kv["type_k"], kv["type_v"]
        self._context = LlamaContext(model=llm._model, params=p, verbose=False)
        self.ctx = self._context.ctx
        self._mem = llama_cpp.llama_get_memory(self.ctx)
        self.recurrent = bool(llama_cpp.llama_model_is_recurrent(self._model.model))
        self.hybrid = bool(llama_cpp.llama_model_is_hybrid(self._model.model))
        self.kv_cells: int = llama_cpp.llama_n_ctx(self.ctx)  # KV cells of the attention layers (shared)
        # a pure recurrent model shares no cells: each sequence may use the whole n_ctx
        self.n_cells: int = self.kv_cells * n_seq if self.recurrent else self.kv_cells
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self._out_rows: list[int] = []  # batch index of each output row, in order

    # -- samplers (built on the request thread, used on the scheduler thread) -----------------

    def new_sampler(self, params: SamplingParams) -> Any:
        """A sampler chain for one sequence, or None for plain greedy (argmax fast path)."""
        lc = self._lc
        penalties = (params.repeat_penalty, params.frequency_penalty, params.presence_penalty) != (1.0, 0.0, 0.0)
        if params.temperature <= 0 and not penalties and not params.grammar and not params.logit_bias:
            return None
        chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
        if params.logit_bias:  # first, on the raw logits, as OpenAI defines it
            arr = (lc.llama_logit_bias * len(params.logit_bias))(*(lc.llama_logit_bias(t, b) for t, b in params.logit_bias))
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_logit_bias(self.n_vocab, len(arr), arr))
        if penalties:
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_penalties(
                self.n_vocab, 64, params.repeat_penalty, params.frequency_penalty, params.presence_penalty))
        if params.grammar:
            lc.llama_sampler_free(chain)
            return Constrained(Sampler.from_params(params, Grammar(self._vocab, self.n_vocab, params.grammar)))
        if params.temperature <= 0:
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_greedy())
            return chain
        seed = params.seed if params.seed is not None else random.getrandbits(31)
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_k(params.top_k))
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_p(params.top_p, 1))
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_min_p(params.min_p, 1))
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_temp(params.temperature))
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_dist(seed & 0xFFFFFFFF))
        return chain

    def free_sampler(self, sampler: Any) -> None:
        if isinstance(sampler, Constrained):
            sampler.close()
        elif sampler is not None:
            self._lc.llama_sampler_free(sampler)

    # -- Decoder protocol (scheduler thread) ------------------------------------------------

    def decode(self, tokens: Seq[int], pos: Seq[int], seq_ids: Seq[int], logits: Seq[bool]) -> None:
        b = self._batch
        rows = []
        for i, (t, p, s, want) in enumerate(zip(tokens, pos, seq_ids, logits)):
            b.token[i], b.pos[i], b.n_seq_id[i] = t, p, 1
            b.seq_id[i][0] = s
            b.logits[i] = want
            if want:
                rows.append(i)
        b.n_tokens = len(tokens)
        self._out_rows = rows
        rc = self._lc.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed ({rc}) on a batch of {len(tokens)} tokens")

    def _row(self, index: int) -> np.ndarray:
        ptr = self._lc.llama_get_logits_ith(self.ctx, self._out_rows[index])
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def sample(self, sampler: Any, index: int) -> int:
        if sampler is None:
            return int(np.argmax(self._row(index)))
        if isinstance(sampler, Constrained):
            return sampler.sample(self._row(index))
        return int(self._lc.llama_sampler_sample(sampler, self.ctx, self._out_rows[index]))

    def logprobs(self, index: int, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
        return token_logprobs(self._row(index), token, k)

    def is_eog(self, token: int) -> bool:
        return bool(self._lc.llama_vocab_is_eog(self._vocab, token))

    def seq_rm(self, seq_id: int, p0: int, p1: int) -> None:
        if not self._lc.llama_memory_seq_rm(self._mem, seq_id, p0, p1):
            # recurrent state cannot be cut at p0 > 0; the scheduler never asks for that in
            # recurrent mode, so reaching here is a bug: fail the step rather than decode garbage
            raise RuntimeError(f"llama.cpp could not remove positions [{p0}, {p1}) of sequence {seq_id}")

    def seq_cp(self, src: int, dst: int, p0: int, p1: int) -> None:
        self._lc.llama_memory_seq_cp(self._mem, src, dst, p0, p1)

    def set_threads(self, n_threads: int) -> None:
        self._lc.llama_set_n_threads(self.ctx, n_threads, n_threads)

    def close(self) -> None:
        if self._batch is not None:
            self._lc.llama_batch_free(self._batch)
            self._batch = None
        self._context.close()


class LlamaCppBatchedBackend(LlamaCppBackend):
    """Tokenizer, chat format and logprob pieces come from LlamaCppBackend; generation is batched."""

    def __init__(self, model_id: str, llm: Any, formatter: Any, path: Path, spec: ModelSpec, n_threads: int) -> None:
        super().__init__(model_id, llm, formatter, path, spec.kv_cache, n_threads)
        self.decoder = LlamaDecoder(llm, spec, n_threads)
        self.n_ctx = self.decoder.kv_cells  # the context each sequence may fill
        self._n_seq = spec.parallel
        self.scheduler = Scheduler(self.decoder, spec.parallel, spec.prefill_chunk,
                                   recurrent=self.decoder.recurrent or self.decoder.hybrid)
        self.embed_batch = min(spec.n_batch, spec.n_ctx)  # this llm's own context is minimal (n_batch 32)

    @classmethod
    def max_concurrency(cls, spec: ModelSpec) -> int:
        return spec.parallel  # one context serves every sequence

    @classmethod
    def estimate(cls, spec: ModelSpec, path: Path | None) -> Estimate:
        """One context: the shared KV cells plus a recurrent state per parallel sequence."""
        assert path is not None
        est = estimate_file(path, spec.n_ctx, spec.kv_cache, n_seq=spec.parallel)
        # + the Llama object's own minimal context (one sequence, HELPER_N_CTX cells): for a
        # recurrent model that is one more state (measured: a 2.2 MB state shows up once more)
        helper = file_kv_cache_bytes(path, HELPER_N_CTX, spec.kv_cache, 1)
        return replace(est, overhead=est.overhead + helper)

    def kv_cache_bytes(self) -> int:
        """The decoder context's sequence memory: shared KV cells + `parallel` recurrent states."""
        if self._kv_bytes is None:
            self._kv_bytes = file_kv_cache_bytes(self._path, self.n_ctx, self._kv_type, self._n_seq)
        return self._kv_bytes

    @classmethod
    def threads(cls, spec: ModelSpec) -> int:
        """One decode runs at a time, for all sequences: it gets every inference CPU."""
        return resolve_threads(spec.n_threads, concurrent=1)

    @classmethod
    def load(cls, model_id: str, spec: ModelSpec, path: Path | None, n_threads: int) -> LlamaCppBatchedBackend:
        assert path is not None
        # This Llama object serves the weights, tokenizer and metadata; its own context is kept
        # minimal (llama.cpp's smallest) because generation runs in the decoder's context.
        llm = new_llama(model_path=str(path), n_ctx=HELPER_N_CTX, n_batch=32, n_threads=1, logits_all=False, verbose=False)
        try:
            return cls(model_id, llm, cls._pick_formatter(llm, spec.chat_format, spec.embedding is not None), path, spec, n_threads)
        except Exception:
            llm.close()
            raise

    def set_threads(self, n_threads: int) -> None:
        self.decoder.set_threads(n_threads)

    def current_threads(self) -> int | None:
        return None  # shared by every sequence in the batch: not one caller's to change

    def generate(
        self, prepared: Prepared, params: SamplingParams, outcome: GenerationOutcome, cancel: threading.Event
    ) -> Iterator[TokenEvent]:
        tokens = self.prompt_tokens(prepared, params, outcome)
        return self._read(submit_new(self.scheduler, self.decoder, tokens, params), params, outcome, cancel)

    def _read(
        self, seq: SeqState, params: SamplingParams, outcome: GenerationOutcome, cancel: threading.Event
    ) -> Iterator[TokenEvent]:
        text = StopText(params.stop)
        try:
            for token, lp in read_tokens(seq, outcome, cancel, _POLL_S):
                raw = self.llm.detokenize([token], special=False)
                if lp is None:
                    yield TokenEvent(token, text.feed(raw))
                else:
                    yield TokenEvent(token, text.feed(raw), lp[0], self.top_pieces(lp[1]), raw.decode("utf-8", "replace"))
                if text.stopped:
                    outcome.finish_reason = "stop"
                    break
            if cancel.is_set():
                return
            tail = text.flush()
            if tail:
                yield TokenEvent(-1, tail)
        finally:
            # a stop string ends a healthy sequence (its KV stays cached); anything else cancels
            self.scheduler.abort(seq, "stop" if outcome.finish_reason == "stop" else "cancel")

    def close(self) -> None:
        if self.llm is None:
            return
        self.scheduler.close()
        self.decoder.close()
        super().close()
