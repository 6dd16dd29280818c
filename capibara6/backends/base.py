"""The one small interface every backend implements.

A backend owns one loaded model instance. The pool hands it out through leases; the API layer
never touches it directly. `generate` is synchronous and runs in a worker thread: it yields one
`TokenEvent` per sampled token and checks `cancel` between tokens so a client that disconnects
stops its generation within a token.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Iterator, Protocol, Sequence


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling settings (OpenAI names, llama.cpp meanings)."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0 -> greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 -> disabled
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repeat_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # None: no logprobs; k >= 0: sampled token + top-k alternatives
    grammar: str | None = None  # GBNF grammar text (response_format json_object / json_schema)


@dataclass(frozen=True)
class TokenEvent:
    """One sampled token. `text` is the text it adds (stop strings already cut out)."""

    token_id: int
    text: str
    logprob: float | None = None
    top_logprobs: dict[str, float] | None = None
    piece: str | None = None  # the token's own text (set with logprobs: stop hold-back can delay `text`)


@dataclass
class GenerationOutcome:
    """Filled in by the backend as generation proceeds; final once the iterator ends."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None  # "stop" | "length" | None while running / when cancelled
    extra: dict[str, object] = field(default_factory=dict)


class ContextLengthExceeded(ValueError):
    """Prompt tokens + max_tokens do not fit the model's context."""

    def __init__(self, prompt_tokens: int, max_tokens: int, n_ctx: int) -> None:
        super().__init__(
            f"This model's maximum context length is {n_ctx} tokens. However, you requested "
            f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} for "
            "the completion). Please reduce the prompt or max_tokens."
        )
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.n_ctx = n_ctx


class Backend(Protocol):
    """A loaded model. Not thread-safe: the pool gives one lease per concurrent generation slot."""

    model_id: str
    n_ctx: int

    def tokenize(self, text: str, *, add_bos: bool = True) -> list[int]:
        """Text -> token ids; special tokens in `text` (chat markup) are parsed as such."""
        ...

    def chat_prompt(self, messages: Sequence[dict[str, object]]) -> tuple[str, tuple[str, ...]]:
        """OpenAI messages -> (prompt text, extra stop strings of the chat format)."""
        ...

    def generate(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams,
        outcome: GenerationOutcome,
        cancel: threading.Event,
    ) -> Iterator[TokenEvent]:
        """Yield tokens until a stop string, EOS, max_tokens or `cancel`; fill `outcome`.

        Raises ContextLengthExceeded before generating when the request cannot fit.
        """
        ...

    def memory_bytes(self) -> int:
        """Best estimate of the bytes this instance holds (weights + KV cache)."""
        ...

    def close(self) -> None:
        """Free every native resource now (not at garbage collection)."""
        ...
