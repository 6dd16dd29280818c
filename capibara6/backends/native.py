"""`native` backend: GGUF models on the project's own kernels (capibara6/engine), FP8 KV cache option.

Events: one TokenEvent per generated token. An end-of-generation token (EOS, <end_of_turn>, ...)
is not a completion token and yields an event only when text held back for a possible stop
string must still be flushed. One backend instance runs one generation at a time.
"""

from __future__ import annotations

import pathlib
import threading
from collections.abc import Iterator, Sequence

from llama_cpp import llama_chat_format

from capibara6.backends.base import (
    ContextLengthExceeded,
    GenerationOutcome,
    SamplingParams,
    TokenEvent,
)
from capibara6.backends.stops import StopText
from capibara6.engine.runner import Runner
from capibara6.engine.sampler import Sampler
from capibara6.engine.tokenizer import Tokenizer

_DEFAULT_CHAT_FORMAT = {"gemma3": "gemma"}
# The registry's kv_cache field also takes llama.cpp's spellings.
_KV_ALIASES = {None: "fp32", "f32": "fp32", "f16": "fp16", "fp8_e4m3": "fp8", "e4m3": "fp8"}


def _text(content: object) -> str:
    """OpenAI message content: a string or a list of {"type": "text", "text": ...} parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return str(content)


class NativeBackend:
    def __init__(self, model_id: str, runner: Runner, tokenizer: Tokenizer, chat_format: str) -> None:
        self.model_id = model_id
        self.runner = runner
        self.tokenizer = tokenizer
        self.n_ctx = runner.n_ctx
        self.chat_format = chat_format

    @classmethod
    def load(cls, model_id: str, path: pathlib.Path, spec: object, n_threads: int, ops: str = "kernels") -> NativeBackend:
        """`spec`: any object with n_ctx, kv_cache ("fp32"|"fp16"|"fp8"|None), chat_format, prefill_chunk.

        ops="kernels" fails loudly when the C kernels are not built rather than serving through
        the ~10x slower numpy reference ("auto" would fall back)."""
        runner = Runner.load(
            path,
            n_ctx=int(getattr(spec, "n_ctx", 2048) or 2048),
            kv_cache=_KV_ALIASES.get(getattr(spec, "kv_cache", None), getattr(spec, "kv_cache", None)),
            prefill_chunk=int(getattr(spec, "prefill_chunk", 256) or 256),
            matmul=str(getattr(spec, "matmul", "int16") or "int16"),
            n_threads=n_threads,
            ops=ops,
        )
        tok = Tokenizer(path)
        fmt = getattr(spec, "chat_format", None) or _DEFAULT_CHAT_FORMAT.get(runner.config.arch, "chatml")
        return cls(model_id, runner, tok, fmt)

    # -- Backend protocol -------------------------------------------------------------------------

    def tokenize(self, text: str, *, add_bos: bool = True) -> list[int]:
        return self.tokenizer.tokenize(text, add_bos=add_bos)

    def chat_prompt(self, messages: Sequence[dict[str, object]]) -> tuple[str, tuple[str, ...]]:
        msgs = [{"role": str(m.get("role", "user")), "content": _text(m.get("content"))} for m in messages]
        if self.chat_format == "gemma":
            # Gemma has no system role: fold system text into the first user turn (llama.cpp's
            # formatter would drop it), then use llama.cpp's formatter so both backends agree.
            system = "\n\n".join(m["content"] for m in msgs if m["role"] == "system")
            msgs = [m for m in msgs if m["role"] != "system"]
            if system:
                for m in msgs:
                    if m["role"] == "user":
                        m["content"] = f"{system}\n\n{m['content']}"
                        break
                else:
                    msgs.insert(0, {"role": "user", "content": system})
        formatter = getattr(llama_chat_format, f"format_{self.chat_format.replace('-', '_')}", None)
        if formatter is None:
            raise ValueError(f"unknown chat_format {self.chat_format!r}")
        res = formatter(messages=msgs)
        stop = res.stop if isinstance(res.stop, list) else ([res.stop] if res.stop else [])
        # A trailing newline in the formatter's separator would only delay the stop.
        return res.prompt, tuple(s.rstrip("\n") or s for s in stop)

    def generate(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams,
        outcome: GenerationOutcome,
        cancel: threading.Event,
    ) -> Iterator[TokenEvent]:
        ids = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            ids = [self.tokenizer.bos_id]
        if len(ids) + params.max_tokens > self.n_ctx:
            raise ContextLengthExceeded(len(ids), params.max_tokens, self.n_ctx)
        outcome.prompt_tokens = len(ids)
        outcome.completion_tokens = 0
        outcome.finish_reason = None
        return self._generate(ids, params, outcome, cancel)

    def _generate(
        self, ids: list[int], params: SamplingParams, outcome: GenerationOutcome, cancel: threading.Event
    ) -> Iterator[TokenEvent]:
        if params.max_tokens <= 0:
            outcome.finish_reason = "length"
            return
        sampler = Sampler.from_params(params)
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
            top: dict[str, float] | None = None
            if res.top is not None:
                top = {}
                for tid, lp in res.top:
                    key = self.tokenizer.piece(tid).decode("utf-8", errors="replace")
                    top[key] = max(lp, top.get(key, lp))
            event = TokenEvent(res.token, emit, res.logprob, top)
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

    def set_threads(self, n_threads: int) -> None:
        """Threads for the next generations (consensus splits the CPUs between experts)."""
        self.runner.n_threads = max(1, n_threads)

    def current_threads(self) -> int:
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
