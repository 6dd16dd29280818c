"""`native` with `parallel: N > 1`: N sequences in ONE engine instance, continuously batched.

The scheduler that drives llama.cpp's batched backend (llamacpp/scheduler.py) drives this one:
`NativeDecoder` is the same `Decoder` protocol over `engine.batch_runner.BatchRunner` (one
mapping of the weights, one paged FP8/fp16/fp32 KV pool of n_ctx positions shared by the
sequences, block tables, prefix blocks shared read-only). Each step decodes a token for every
running sequence and spends the rest of `prefill_chunk` on waiting prompts, in one forward pass,
so every weight is read once per step for all sequences.

Per sequence: its own `engine.sampler.Sampler` (seed, penalties over its own history, logit
bias, logprobs, grammar), stop strings and UTF-8 streaming on the request thread, cancellation
through `Scheduler.abort` (its blocks are freed before the next step). Embeddings run on a
single-sequence `Runner` over the same mapped weights (its own small KV cache).
"""

from __future__ import annotations

import pathlib
import threading
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..chat_templates import Formatter
from ..engine.batch_runner import BatchRunner
from ..engine.grammar import Grammar
from ..engine.runner import Runner
from ..engine.sampler import Sampler, SampleResult
from ..engine.tokenizer import Tokenizer
from ..threads import resolve_threads
from ..types import GenerationOutcome, Prepared, SamplingParams, TokenEvent
from .llamacpp.scheduler import Scheduler, SeqState, read_tokens, submit_new
from .native import NativeBackend
from .stops import StopText

if TYPE_CHECKING:
    from ..config import ModelSpec

_POLL_S = 0.05  # how often a reader waiting for its next token re-checks `cancel`
BLOCK = 16  # KV positions per block (vLLM's default; a sequence wastes at most BLOCK - 1 rows)


class NativeDecoder:
    """The Decoder protocol (llamacpp/scheduler.py) on the native engine; scheduler thread only,
    except `new_sampler` (request threads)."""

    # every row takes its alone kernel path (engine/batch_runner.py), so a preempted sequence
    # recomputed in its original chunks gets its original logits bit for bit (scheduler.py)
    exact_recompute = True

    def __init__(self, runner: BatchRunner, tokenizer: Tokenizer) -> None:
        self.runner = runner
        self.tokenizer = tokenizer
        self.n_cells = runner.n_ctx
        self._tokens: list[list[int]] = [[] for _ in range(runner.n_seq)]  # what each sequence id holds (penalties)
        self._logits = np.zeros((0, runner.n_vocab), np.float32)
        self._out_seq: list[int] = []  # sequence id of each logits row
        self._last: dict[int, SampleResult] = {}

    def new_sampler(self, params: SamplingParams) -> Sampler:
        grammar = Grammar.for_tokenizer(self.tokenizer, params.grammar) if params.grammar else None
        return Sampler.from_params(params, grammar)

    def free_sampler(self, sampler: Any) -> None:
        if sampler is not None and sampler.grammar is not None:
            sampler.grammar.close()

    def decode(self, tokens: Sequence[int], pos: Sequence[int], seq_ids: Sequence[int], logits: Sequence[bool]) -> None:
        self._logits = self.runner.step(tokens, pos, seq_ids, logits)
        self._out_seq = [s for s, want in zip(seq_ids, logits) if want]
        self._last = {}
        for t, s in zip(tokens, seq_ids):
            self._tokens[s].append(t)

    def sample(self, sampler: Any, index: int) -> int:
        res: SampleResult = sampler.sample(self._logits[index], self._tokens[self._out_seq[index]])
        self._last[index] = res
        return res.token

    def logprobs(self, index: int, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
        res = self._last[index]
        assert res.token == token and res.logprob is not None  # the sequence's Sampler was built with logprobs
        return res.logprob, list(res.top or ())

    def is_eog(self, token: int) -> bool:
        return token in self.tokenizer.eog_ids

    def reusable(self, seq_id: int, n: int) -> bool:
        return self.runner.kv.reusable(seq_id, n)

    def keep(self, seq_id: int) -> Any:
        """Before a preemption drops the sequence: its FP8 key shifts, so that its recompute stores
        keys as they were first stored (a shift taken again from the recompute's first chunk, which
        then held generated tokens too, moved logprobs by up to 0.17 nats)."""
        return self.runner.kv.shifts(seq_id)

    def restore(self, seq_id: int, kept: Any) -> None:
        self.runner.kv.set_shifts(seq_id, kept)

    def seq_rm(self, seq_id: int, p0: int, p1: int) -> None:
        if p1 >= 0 and p1 < self.runner.kv.length(seq_id):
            raise ValueError("the paged cache drops a sequence's tail only (p1 = -1)")
        self.runner.kv.truncate(seq_id, p0)
        del self._tokens[seq_id][p0:]

    def seq_cp(self, src: int, dst: int, p0: int, p1: int) -> None:
        if p0 != 0:
            raise ValueError("the paged cache shares prefixes only (p0 = 0)")
        self.runner.kv.fork(src, dst, p1)
        self._tokens[dst] = self._tokens[src][:p1]


class NativeBatchedBackend(NativeBackend):
    """Tokenizer, templates, embeddings and logprob pieces from NativeBackend; generation batched."""

    def __init__(self, model_id: str, runner: Runner, tokenizer: Tokenizer, chat_format: str, spec: ModelSpec,
                 formatter: Formatter | None = None) -> None:
        super().__init__(model_id, runner, tokenizer, chat_format, formatter)
        self.batch = BatchRunner(
            runner.model, n_seq=spec.parallel, n_ctx=spec.n_ctx, kv_cache=spec.kv_cache or "fp32",
            prefill_chunk=spec.prefill_chunk, block=BLOCK, n_threads=runner.n_threads, ops=runner.ops, matmul=spec.matmul,
        )
        self.decoder = NativeDecoder(self.batch, tokenizer)
        self.scheduler = Scheduler(self.decoder, spec.parallel, spec.prefill_chunk)

    @classmethod
    def max_concurrency(cls, spec: ModelSpec) -> int:
        return spec.parallel  # one instance serves every sequence

    @classmethod
    def threads(cls, spec: ModelSpec) -> int:
        """One step runs at a time, for all sequences: it gets every inference CPU."""
        return resolve_threads(spec.n_threads, concurrent=1)

    @classmethod
    def load(cls, model_id: str, spec: ModelSpec, path: pathlib.Path | None, n_threads: int,
             ops: str = "kernels") -> NativeBatchedBackend:
        single = NativeBackend.load(model_id, spec, path, n_threads, ops)  # weights, tokenizer, template
        try:
            return cls(model_id, single.runner, single.tokenizer, single.chat_format, spec, single._formatter)
        except Exception:
            single.close()
            raise

    def generate(
        self, prepared: Prepared, params: SamplingParams, outcome: GenerationOutcome, cancel: threading.Event
    ) -> Iterator[TokenEvent]:
        ids = self._start(prepared, params, outcome)
        if params.max_tokens <= 0:
            outcome.finish_reason = "length"
            return iter(())
        return self._read(submit_new(self.scheduler, self.decoder, ids, params), params, outcome, cancel)

    def _read(
        self, seq: SeqState, params: SamplingParams, outcome: GenerationOutcome, cancel: threading.Event
    ) -> Iterator[TokenEvent]:
        text = StopText(params.stop)
        dec = self.tokenizer.stream()
        try:
            for token, lp in read_tokens(seq, outcome, cancel, _POLL_S):
                emit = text.push(dec.add(token))
                if lp is None:
                    yield TokenEvent(token, emit)
                else:
                    yield TokenEvent(token, emit, lp[0], self.top_pieces(lp[1]))
                if text.stopped:
                    outcome.finish_reason = "stop"
                    break
            if cancel.is_set():
                return
            tail = "" if text.stopped else text.push(dec.flush())
            tail += text.flush()
            if tail:
                yield TokenEvent(-1, tail)
        finally:
            # a stop string ends a healthy sequence (its KV stays cached); anything else cancels
            self.scheduler.abort(seq, "stop" if outcome.finish_reason == "stop" else "cancel")

    def set_threads(self, n_threads: int) -> None:
        super().set_threads(n_threads)
        self.batch.n_threads = max(1, n_threads)

    def current_threads(self) -> int | None:
        return None  # shared by every sequence in the batch: not one caller's to change

    def memory_bytes(self) -> int:
        return self.batch.memory_bytes() + self.runner.kv.nbytes()

    def kv_cache_bytes(self) -> int:
        """Blocks in use in the paged pool now, plus the embedding runner's own cache."""
        return self.batch.kv.nbytes() + self.runner.kv.nbytes()

    def close(self) -> None:
        self.scheduler.close()
        self.batch.kv.groups = []
        super().close()
