"""`native` backend: GGUF models on the project's own kernels (capibara6/engine), FP8 KV cache option.

Events: one TokenEvent per generated token. An end-of-generation token (EOS, <end_of_turn>, ...)
is not a completion token and yields an event only when text held back for a possible stop
string must still be flushed. One backend instance runs one generation at a time.

`SamplingParams.grammar` (response_format, tool calls) is enforced by llama.cpp's grammar engine
on our logits (capibara6/engine/grammar.py, sampled as engine/sampler.py says): one Grammar per
generation, built in `generate()` so an unparsable grammar is a 400 before anything streams, and
freed when the generation ends, is cancelled or is dropped. A grammar that completes allows only
end-of-generation tokens, so it ends the answer with finish_reason "stop".
"""

from __future__ import annotations

import pathlib
import threading
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from ..chat_templates import Formatter, get_formatter, jinja_formatter
from ..engine.grammar import Grammar
from ..engine.runner import Runner
from ..engine.sampler import Sampler
from ..engine.tokenizer import Tokenizer
from ..gguf_header import estimate_file, read_header
from ..threads import resolve_threads
from ..types import (
    Capabilities,
    ChatPrompt,
    ContextLengthExceeded,
    Estimate,
    GenerationOutcome,
    Pooling,
    Prepared,
    Prompt,
    SamplingParams,
    TextPrompt,
    TokenEvent,
)
from .checks import check_logit_bias, check_token_ids
from .pooling import check_inputs, normalized, pool
from .stops import StopText

if TYPE_CHECKING:
    from ..config import ModelSpec

_DEFAULT_CHAT_FORMAT = {"gemma3": "gemma"}
CAPABILITIES = Capabilities(grammar=True)  # llama.cpp's grammar engine on our logits (engine/grammar.py)


class NativeBackend:
    def __init__(self, model_id: str, runner: Runner, tokenizer: Tokenizer, chat_format: str,
                 formatter: Formatter | None = None) -> None:
        self.model_id = model_id
        self.runner = runner
        self.tokenizer = tokenizer
        self.n_ctx = runner.n_ctx
        self.chat_format = chat_format
        # the one chat-template path (chat_templates.py); "jinja" comes with the GGUF's own formatter
        self._formatter = formatter or get_formatter(chat_format)

    # -- class side (backends/base.py BackendClass) --------------------------------------------

    @classmethod
    def capabilities(cls, spec: ModelSpec) -> Capabilities:
        return replace(CAPABILITIES, embeddings=spec.embedding is not None)

    @classmethod
    def max_concurrency(cls, spec: ModelSpec) -> int:
        return 1  # one sequence per instance; `parallel` instances share the mapped weights

    @classmethod
    def threads(cls, spec: ModelSpec) -> int:
        return resolve_threads(spec.n_threads, concurrent=spec.parallel)

    @classmethod
    def estimate(cls, spec: ModelSpec, path: pathlib.Path | None) -> Estimate:
        """The file's blocks are read in place (mapped), except in matmul fp32 mode, which holds
        every weight as float32 (4 bytes per weight: 3.45x the RSS of the blocks on Gemma 3 270M)."""
        assert path is not None
        est = estimate_file(path, spec.n_ctx, spec.kv_cache or "fp32")
        if spec.matmul != "fp32":
            return est
        from gguf import GGML_QUANT_SIZES

        try:
            infos = read_header(path).tensors
        except (ValueError, OSError):
            return est
        n = 0
        for t in infos:
            block, size = GGML_QUANT_SIZES[t.ggml_type]  # type: ignore[index]
            elems = 1
            for d in t.dims:
                elems *= d
            n += elems // block * block
        return Estimate(4 * n, est.kv, est.overhead)

    @classmethod
    def load(cls, model_id: str, spec: ModelSpec, path: pathlib.Path | None, n_threads: int, ops: str = "kernels") -> NativeBackend:
        """ops="kernels" fails loudly when the C kernels are not built rather than serving through
        the ~10x slower numpy reference ("auto" would fall back)."""
        assert path is not None
        runner = Runner.load(
            path, n_ctx=spec.n_ctx, kv_cache=spec.kv_cache or "fp32", prefill_chunk=spec.prefill_chunk,
            matmul=spec.matmul, n_threads=n_threads, ops=ops,
        )
        tok = Tokenizer(path)
        fmt = spec.chat_format or _DEFAULT_CHAT_FORMAT.get(runner.config.arch, "chatml")
        backend = cls(model_id, runner, tok, fmt)
        template = read_header(path).metadata.get("tokenizer.chat_template")
        if not spec.chat_format and isinstance(template, str) and runner.config.arch not in _DEFAULT_CHAT_FORMAT:
            # the GGUF's own template, as the llama.cpp backend uses it: identical prompts (and tools) on both
            bos, eos = tok.special_text(tok.bos_id), tok.special_text(tok.eos_id)
            backend.chat_format, backend._formatter = "jinja", jinja_formatter(template, bos, eos)
        return backend

    # -- instance side (backends/base.py Backend) ----------------------------------------------

    def tokenize(self, text: str, *, add_bos: bool = True) -> list[int]:
        return self.tokenizer.tokenize(text, add_bos=add_bos)

    def detokenize(self, ids: Sequence[int]) -> str:
        return b"".join(self.tokenizer.piece(i) for i in ids).decode("utf-8", errors="replace")

    def prepare(self, prompt: Prompt) -> Prepared:
        if isinstance(prompt, ChatPrompt):
            text, stops = self._formatter(list(prompt.messages), prompt.tools)
            ids = self.tokenize(text)
            return Prepared(prompt, tuple(ids), len(ids), stops, text)
        if isinstance(prompt, TextPrompt):
            ids = self.tokenize(prompt.text) or [self.tokenizer.bos_id]
            return Prepared(prompt, tuple(ids), len(ids), (), prompt.text)
        check_token_ids(prompt.ids, self.tokenizer.n_vocab)
        return Prepared(prompt, prompt.ids, len(prompt.ids))

    def generate(
        self, prepared: Prepared, params: SamplingParams, outcome: GenerationOutcome, cancel: threading.Event
    ) -> Iterator[TokenEvent]:
        ids = self._start(prepared, params, outcome)
        grammar = Grammar.for_tokenizer(self.tokenizer, params.grammar) if params.grammar else None
        return self._constrained(ids, params, outcome, cancel, grammar)

    def _start(self, prepared: Prepared, params: SamplingParams, outcome: GenerationOutcome) -> list[int]:
        """The prompt ids of a generation, after the checks every native generation makes first."""
        ids = list(prepared.tokens or ()) or [self.tokenizer.bos_id]
        check_logit_bias(params.logit_bias, self.tokenizer.n_vocab)
        if len(ids) + params.max_tokens > self.n_ctx:
            raise ContextLengthExceeded(len(ids), params.max_tokens, self.n_ctx)
        outcome.prompt_tokens = len(ids)
        outcome.completion_tokens = 0
        outcome.finish_reason = None
        return ids

    def _constrained(
        self, ids: list[int], params: SamplingParams, outcome: GenerationOutcome, cancel: threading.Event,
        grammar: Grammar | None,
    ) -> Iterator[TokenEvent]:
        try:
            yield from self._generate(ids, params, outcome, cancel, grammar)
        finally:  # end, cancel, or the consumer closing the iterator (a dropped one: the Grammar's finalizer)
            if grammar is not None:
                grammar.close()

    def _generate(
        self, ids: list[int], params: SamplingParams, outcome: GenerationOutcome, cancel: threading.Event,
        grammar: Grammar | None = None,
    ) -> Iterator[TokenEvent]:
        if params.max_tokens <= 0:
            outcome.finish_reason = "length"
            return
        sampler = Sampler.from_params(params, grammar)
        dec = self.tokenizer.stream()
        eog = self.tokenizer.eog_ids
        text = StopText(params.stop)  # holds back what may be the start of a stop string
        steps = self.runner.generate(ids, sampler, params.max_tokens, stop_ids=eog, cancel=cancel)
        for step in steps:
            res = step.sample
            is_eog = res.token in eog
            last = is_eog or outcome.completion_tokens + 1 >= params.max_tokens
            emit = text.push(dec.flush() if is_eog else dec.add(res.token))
            if last:
                emit += text.push("" if is_eog else dec.flush()) + text.flush()
            hit = text.stopped
            event = TokenEvent(res.token, emit, res.logprob, None if res.top is None else self.top_pieces(res.top))
            if is_eog:
                outcome.finish_reason = "stop"
                if emit:  # only to flush held-back text; EOS is not a completion token
                    yield event
                return
            outcome.completion_tokens += 1
            if hit:
                outcome.finish_reason = "stop"
                yield event
                return
            if last:
                outcome.finish_reason = "length"
            yield event
            if last or cancel.is_set():
                return

    def top_pieces(self, ranked: Sequence[tuple[int, float]]) -> dict[str, float]:
        """[(token id, logprob)] -> {token text: logprob}; tokens with the same text keep the best."""
        top: dict[str, float] = {}
        for tid, lp in ranked:
            key = self.tokenizer.piece(tid).decode("utf-8", errors="replace")
            top[key] = max(lp, top.get(key, lp))
        return top

    def embed(
        self, prepared: Sequence[Prepared], pooling: Pooling, normalize: bool, cancel: threading.Event | None = None
    ) -> list[np.ndarray]:
        """Our own final hidden states (Runner.hidden_states), pooled. One input per forward pass:
        the runner holds one sequence, so inputs are not packed together (llama.cpp's are)."""
        inputs = check_inputs(prepared, self.n_ctx)
        out = []
        for ids in inputs:
            if cancel is not None and cancel.is_set():
                break
            v = pool(self.runner.hidden_states(ids or [self.tokenizer.bos_id]), pooling)
            out.append(normalized(v) if normalize else v)
        return out

    def set_threads(self, n_threads: int) -> None:
        """Threads for the next generations (consensus splits the CPUs between experts)."""
        self.runner.n_threads = max(1, n_threads)

    def current_threads(self) -> int | None:
        return self.runner.n_threads

    def memory_bytes(self) -> int:
        return self.runner.memory_bytes()

    def kv_cache_bytes(self) -> int:
        """Bytes the KV cache holds now (it grows with the sequence; rings bound sliding layers)."""
        return self.runner.kv.nbytes()

    def close(self) -> None:
        self.tokenizer.close()
        self.runner.kv.layers = []
        self.runner.model.tensors.clear()
