"""OpenAI request schemas, and the one rule every request field follows.

Fields shared by both endpoints are declared once in `_Sampling`.

The rule. Every field of OpenAI's chat completions and completions requests (the reference and
openai-python's `ChatCompletionCreateParams` / `CompletionCreateParams`) is in exactly one place:

- honoured: declared on the models below and mapped into the plan (`api/app.py`);
- no effect: `NO_EFFECT`, accepted with any value and dropped, because it changes nothing that
  is generated (billing, storage, caching hints, abuse identifiers);
- unsupported: `CHAT_UNSUPPORTED` / `COMPLETION_UNSUPPORTED`, a 400 `invalid_request_error`
  whose `param` is the field, unless its value is null or the field's default, which asks for
  exactly what we do anyway (`tools: []`, `parallel_tool_calls: true`, `best_of: 1`, ...);
- anything else: unknown, a 400 naming it, as OpenAI answers ("Unrecognized request argument
  supplied"), except capibara6's own extensions declared on the models (`top_k`, `min_p`,
  `repeat_penalty`, `consensus`).

Why refuse unknown fields, where vLLM and llama.cpp accept them? vLLM first forbade extra fields
and then (PR #10463) accepted them with a server-side warning, because clients written against
OpenAI send fields vLLM had not declared yet; llama.cpp's server copies unknown fields into its
parameters and ignores what it does not know, and refuses only a short list by name (`n != 1`,
`best_of`, `suffix`, `tools` without `--jinja`). Both answer a typo (`temprature`) or an unmet
feature with a 200 the client cannot tell from a real one, and a warning only the operator sees.
We keep both of their lessons instead: the no-effect table lists every field OpenAI documents
today, so an OpenAI client is never refused for a field that would change nothing, and whatever
we do refuse is named in the error the client gets. A new OpenAI field lands in one of the
tables with one line. Like vLLM (`validate_stream_options`; its tests/entrypoints/openai expect a
BadRequestError for `stream_options` with `stream=False` and for a malformed or out-of-vocabulary
`logit_bias` key) we refuse those; like llama.cpp (whose tools/server/tests send its own fields,
`grammar`, `json_schema`, next to OpenAI's) our extensions are plain declared fields; like
llama.cpp we refuse `best_of` and `suffix`, but let their no-op values through, as OpenAI does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Literal, Mapping, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from ..orchestrator.routing import ConsensusOptions  # the consensus port's request extension

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
LOGIT_BIAS_MAX_ENTRIES = 1024
_TOKEN_ID = re.compile(r"0|[1-9][0-9]{0,9}")  # a token id as OpenAI writes it: a decimal string

# -- the field table ------------------------------------------------------------------------------

# Accepted on both endpoints with any value, and dropped: none of them changes what is generated.
NO_EFFECT: dict[str, str] = {
    "user": "an end-user id for OpenAI's abuse monitoring and cache bucketing",
    "safety_identifier": "an end-user id for OpenAI's abuse monitoring",
    "metadata": "tags for stored completions; nothing is stored here",
    "store": "keeps the completion for OpenAI's evals and distillation; nothing is stored here",
    "service_tier": "OpenAI's processing tier (price and latency, not the text)",
    "prompt_cache_key": "a prompt-cache routing hint; our prefix cache needs none",
    "prompt_cache_retention": "how long OpenAI keeps cached prefixes",
    "prompt_cache_options": "OpenAI's cache breakpoints and their lifetime",
    "prediction": "predicted outputs only speed up decoding; the text is the model's own either way",
}


@dataclass(frozen=True)
class Refusal:
    """A known OpenAI field we do not honour: refused unless its value asks for nothing."""

    why: str
    accepts: Callable[[Any], bool] = lambda v: False  # values that ask for what we do anyway

    def message(self, name: str) -> str:
        return f"Unsupported parameter: '{name}' is not supported here: {self.why}"


_LEGACY = "the deprecated functions API is not served: send the same functions as `tools`"


def _is(*values: Any) -> Callable[[Any], bool]:
    return lambda v: any(type(v) is type(x) and v == x for x in values)


CHAT_UNSUPPORTED: dict[str, Refusal] = {
    "functions": Refusal(f"{_LEGACY}; send no functions, or functions: [].", _is([])),
    "function_call": Refusal(f"{_LEGACY} and `tool_choice`; omit function_call or send 'none'.", _is("none")),
    "audio": Refusal("output is text only; omit audio."),
    "modalities": Refusal("output is text only; omit modalities or send ['text'].", _is(["text"])),
    "web_search_options": Refusal("there is no web search; omit web_search_options."),
    # a thinking template's depth is not a knob on the models served here: only "no thinking asked for" is honoured
    "reasoning_effort": Refusal("no served model takes a reasoning budget; omit it or send 'none'.", _is("none")),
    "verbosity": Refusal("no verbosity control; omit it or send 'medium' (the default).", _is("medium")),
    "moderation": Refusal("no moderation model runs, so nothing would be scored or blocked; omit moderation."),
}

COMPLETION_UNSUPPORTED: dict[str, Refusal] = {
    "best_of": Refusal("no server-side best-of ranking; omit best_of or send 1, and use n.", _is(1)),
    "suffix": Refusal("no fill-in-the-middle; omit suffix or send ''.", _is("")),
}


def _apply_rule(data: Any, unsupported: dict[str, Refusal], no_effect: Mapping[str, str] = NO_EFFECT) -> Any:
    """Drop the no-effect fields and nulls (null is absent, as in OpenAI's API: `temperature:
    null` is the default), refuse the unsupported ones; unknown ones stay for `extra=forbid`.
    Each endpoint passes its own tables (chat, completions, embeddings, responses)."""
    if not isinstance(data, dict):
        return data
    kept = {}
    for name, value in data.items():
        if name in no_effect or (value is None and name not in unsupported):
            continue
        refusal = unsupported.get(name)
        if refusal is None:
            kept[name] = value
        elif value is not None and not refusal.accepts(value):
            # `param` in ctx: the HTTP layer puts it in the error's `param` (api/app.py)
            raise PydanticCustomError("unsupported_field", "{message}", {"param": name, "message": refusal.message(name)})
    return kept


# A chat message's content: a string or a list of parts ({"type": "text", "text": ...}).
Content = Union[str, list[dict[str, Any]], None]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Content = None
    name: str | None = None

    tool_calls: list[dict[str, Any]] | None = None  # an assistant turn's calls (OpenAI's shape)
    tool_call_id: str | None = None  # a tool turn: the call it answers

    @model_validator(mode="after")
    def _roles_and_calls(self) -> ChatMessage:
        """Calls only on assistant turns, a call id on every tool turn; the deprecated
        `function_call` is refused, not dropped from the prompt."""
        if (self.model_extra or {}).get("function_call"):
            raise ValueError(f"a message with function_call is not supported: {_LEGACY}")
        if self.tool_calls and self.role != "assistant":
            raise ValueError(f"tool_calls are only allowed on assistant messages, not {self.role!r}")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id of the call it answers")
        return self

    def text(self) -> str:
        """The message's text; image or audio parts are refused (no multimodal support)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"content part of type {part.get('type')!r} is not supported (text only)")
            parts.append(part["text"])
        return "".join(parts)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False
    include_obfuscation: bool | None = None  # no effect: our chunks carry no obfuscation padding


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str = "response"
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JsonSchemaFormat | None = None


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    _unsupported: ClassVar[dict[str, Refusal]] = {}

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repeat_penalty: float = Field(1.0, gt=0.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    n: int = Field(1, ge=1)
    stream: bool | None = None
    stream_options: StreamOptions | None = None  # only with a stream: checked in api/app.py (the default is per port)
    logit_bias: dict[str, float] | None = None  # token id (decimal string) -> bias in [-100, 100]
    consensus: ConsensusOptions | None = None

    @model_validator(mode="before")
    @classmethod
    def _one_rule(cls, data: Any) -> Any:
        return _apply_rule(data, cls._unsupported)

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _logit_bias_numbers(cls, v: Any) -> Any:
        if isinstance(v, dict) and any(isinstance(x, bool) or not isinstance(x, (int, float)) for x in v.values()):
            bad = sorted(k for k, x in v.items() if isinstance(x, bool) or not isinstance(x, (int, float)))
            raise ValueError(f"logit_bias values must be numbers in [-100, 100]; not a number at token {', '.join(map(repr, bad))}")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias_range(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if not v:
            return v
        if len(v) > LOGIT_BIAS_MAX_ENTRIES:
            raise ValueError(f"logit_bias may hold at most {LOGIT_BIAS_MAX_ENTRIES} entries, not {len(v)}")
        bad_keys = [k for k in v if not _TOKEN_ID.fullmatch(k)]
        if bad_keys:
            raise ValueError(f"logit_bias keys must be token ids (non-negative integers as decimal strings), not {', '.join(map(repr, bad_keys))}")
        bad_values = [k for k, x in v.items() if not -100.0 <= x <= 100.0]
        if bad_values:
            raise ValueError(f"logit_bias values must be in [-100, 100]; out of range at token {', '.join(map(repr, bad_values))}")
        return v

    def logit_bias_pairs(self) -> tuple[tuple[int, float], ...]:
        """(token id, bias) sorted by id; () when none is asked for."""
        return tuple(sorted((int(k), float(x)) for k, x in (self.logit_bias or {}).items()))

    @field_validator("stop")
    @classmethod
    def _stop_non_empty(cls, v: str | list[str] | None) -> str | list[str] | None:
        items = [v] if isinstance(v, str) else (v or [])
        if any(not s for s in items):
            raise ValueError("stop sequences must be non-empty strings")
        return v

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatCompletionRequest(_Sampling):
    _unsupported: ClassVar[dict[str, Refusal]] = CHAT_UNSUPPORTED

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None  # checked (and compiled to grammars) in capibara6/tools
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True

    @model_validator(mode="after")
    def _top_logprobs_needs_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            message = "top_logprobs requires logprobs to be true."
            raise PydanticCustomError("top_logprobs_without_logprobs", "{message}", {"param": "top_logprobs", "message": message})
        return self

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


PromptInput = Union[str, list[str], list[int], list[list[int]]]


class CompletionRequest(_Sampling):
    _unsupported: ClassVar[dict[str, Refusal]] = COMPLETION_UNSUPPORTED

    prompt: PromptInput
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    response_format: ResponseFormat | None = None

    def prompts(self) -> list[str | list[int]]:
        """The prompt field as a list of prompts (each text or token ids)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise ValueError("prompt must not be empty")
        if all(isinstance(x, str) for x in p):
            return [x for x in p if isinstance(x, str)]
        if all(isinstance(x, int) for x in p):
            return [[x for x in p if isinstance(x, int)]]
        return [list(x) for x in p if isinstance(x, list)]

    def token_limit(self) -> int | None:
        return self.max_tokens
