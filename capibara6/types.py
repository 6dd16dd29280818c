"""The bottom layer: what the parts of capibara6 hand each other. Imports nothing of the project.

Everything above reads these names from here: the HTTP layer builds a `Prompt` and
`SamplingParams`, the service asks a backend to `prepare` the prompt (templating and tokenizing
happen there, once, per backend) and to `generate` `TokenEvent`s, filling a `GenerationOutcome`.
A backend says what it honours in its `Capabilities`; a request that asks for more is refused
with a 400 naming the field, never silently served without it. The vocabularies (backend names,
KV cache types, consensus strategies) are Literals here, so a typo in models.yaml stops start-up.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Literal, Union, get_args

# -- vocabularies ---------------------------------------------------------------------------------

BackendName = Literal["llamacpp", "native", "remote"]
LlamaKvCache = Literal["f32", "f16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0"]
NativeKvCache = Literal["fp32", "fp16", "fp8"]
KvCache = Union[LlamaKvCache, NativeKvCache]
KV_CACHE_TYPES: dict[str, tuple[str, ...]] = {
    "llamacpp": get_args(LlamaKvCache),
    "native": get_args(NativeKvCache),
    "remote": (),
}
Strategy = Literal["fastest", "vote", "judge", "synthesize"]
MatmulMode = Literal["int16", "int8", "fp32"]
FinishReason = Literal["stop", "length"]
Pooling = Literal["mean", "cls", "last"]  # how an embedding model turns per-token states into one vector

# -- prompts --------------------------------------------------------------------------------------

Message = dict[str, Any]  # one OpenAI chat message: {"role": ..., "content": str | [parts], ...}


@dataclass(frozen=True)
class ChatPrompt:
    """Chat messages; the backend applies its model's template (remote: the remote server does)."""

    messages: tuple[Message, ...]
    tools: tuple[dict[str, Any], ...] = ()  # OpenAI tool objects, for templates that render them


@dataclass(frozen=True)
class TextPrompt:
    """Plain text, tokenized as is (special-token markup in it is parsed as such)."""

    text: str


@dataclass(frozen=True)
class TokenPrompt:
    """Token ids of the model's own vocabulary; ids outside it are refused, never truncated."""

    ids: tuple[int, ...]


Prompt = Union[ChatPrompt, TextPrompt, TokenPrompt]


@dataclass(frozen=True)
class Prepared:
    """A prompt made ready by one backend instance. Invariant: `n_tokens` is what the context
    check and the prompt limit count (the real token count, or the remote's estimate)."""

    prompt: Prompt
    tokens: tuple[int, ...] | None  # None: this backend never sees token ids (remote)
    n_tokens: int
    stops: tuple[str, ...] = ()  # stop strings the chat template adds (e.g. "<end_of_turn>")
    text: str | None = None  # the templated text, when there is one


# -- sampling and events --------------------------------------------------------------------------


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
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)


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
    cached_tokens: int = 0  # prompt tokens whose KV was reused (usage.prompt_tokens_details)


# -- capabilities ---------------------------------------------------------------------------------

# SamplingParams field -> (the request field a user sets, the value that means "not asked for")
_PARAM_FIELDS: dict[str, tuple[str, Any]] = {
    "grammar": ("response_format", None),
    "logprobs": ("logprobs", None),
    "logit_bias": ("logit_bias", ()),
    "top_k": ("top_k", 0),
    "min_p": ("min_p", 0.0),
    "repeat_penalty": ("repeat_penalty", 1.0),
    "presence_penalty": ("presence_penalty", 0.0),
    "frequency_penalty": ("frequency_penalty", 0.0),
    "seed": ("seed", None),
}


@dataclass(frozen=True)
class Capabilities:
    """What a backend honours. A request asking for what is False here gets a 400 naming the field."""

    grammar: bool = True
    logprobs: bool = True
    logit_bias: bool = True
    top_k: bool = True
    min_p: bool = True
    repeat_penalty: bool = True
    presence_penalty: bool = True
    frequency_penalty: bool = True
    seed: bool = True
    token_prompts: bool = True  # a prompt given as token ids
    echo: bool = True  # the prompt's text can be given back (completions `echo`)
    local: bool = True  # generates on this machine's CPUs (consensus splits its threads)
    embeddings: bool = False  # /v1/embeddings: decided per entry (ModelSpec.embedding), never per class
    tools: bool = True  # tool calls are generated here, under a grammar (a remote does not forward tools)

    def refused(self, params: SamplingParams) -> list[str]:
        """Request field names that `params` asks for and this backend cannot honour."""
        out = []
        for f in fields(self):
            if f.name in _PARAM_FIELDS and not getattr(self, f.name):
                request_field, unset = _PARAM_FIELDS[f.name]
                if getattr(params, f.name) != unset:
                    out.append(request_field)
        return out


@dataclass(frozen=True)
class Estimate:
    """Bytes a model will hold, known before it loads (from its file's header and its entry)."""

    weights: int
    kv: int
    overhead: int

    @property
    def first(self) -> int:
        """Bytes for the first instance of the model."""
        return self.weights + self.kv + self.overhead

    @property
    def extra(self) -> int:
        """Bytes for each further instance (weights shared through mmap)."""
        return self.kv + self.overhead


ZERO_ESTIMATE = Estimate(0, 0, 0)

# -- errors ---------------------------------------------------------------------------------------


class BackendError(ValueError):
    """A request this backend cannot serve as asked: the API answers 400 with `param` and `code`."""

    param: str | None = None
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param if param is not None else self.param
        self.code = code if code is not None else self.code


class ContextLengthExceeded(BackendError):
    """Prompt tokens + max_tokens do not fit the model's context."""

    param = "messages"
    code = "context_length_exceeded"

    def __init__(self, prompt_tokens: int, max_tokens: int, n_ctx: int) -> None:
        super().__init__(
            f"This model's maximum context length is {n_ctx} tokens. However, you requested "
            f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} for "
            "the completion). Please reduce the prompt or max_tokens."
        )
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.n_ctx = n_ctx


class InvalidPrompt(BackendError):
    """The prompt cannot be served: empty, token ids outside the vocabulary, bad content parts."""

    param = "prompt"


class Unsupported(BackendError):
    """A request field this model's backend does not honour."""

    code = "unsupported_parameter"

    def __init__(self, model_id: str, request_field: str, why: str = "") -> None:
        super().__init__(
            f"Model '{model_id}' does not support `{request_field}`{': ' + why if why else ''}.", param=request_field
        )
        self.model_id = model_id


class InputTooLong(BackendError):
    """One embeddings input does not fit the model's context (the message names its index)."""

    param = "input"
    code = "context_length_exceeded"

    def __init__(self, index: int, n_tokens: int, n_ctx: int) -> None:
        super().__init__(
            f"Input {index} has {n_tokens} tokens; this model's maximum context length is {n_ctx} tokens. "
            "Please shorten it."
        )
        self.index = index


__all__ = [
    "KV_CACHE_TYPES", "ZERO_ESTIMATE", "BackendError", "BackendName", "Capabilities", "ChatPrompt",
    "ContextLengthExceeded", "Estimate", "FinishReason", "GenerationOutcome", "InputTooLong", "InvalidPrompt", "KvCache",
    "LlamaKvCache", "MatmulMode", "Message", "NativeKvCache", "Pooling", "Prepared", "Prompt", "SamplingParams",
    "Strategy", "TextPrompt", "TokenEvent", "TokenPrompt", "Unsupported",
]
