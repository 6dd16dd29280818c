"""Per-template tool-call formats. STUB: interface only."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence, Union

from .spec import ToolCall, ToolChoice, ToolSpec


@dataclass
class Parsed:
    content: str | None
    calls: list[ToolCall] = field(default_factory=list)


@dataclass(frozen=True)
class ContentDelta:
    text: str


@dataclass(frozen=True)
class CallStart:
    index: int
    id: str
    name: str


@dataclass(frozen=True)
class CallArguments:
    index: int
    fragment: str


Event = Union[ContentDelta, CallStart, CallArguments]


class StreamParser(Protocol):
    def feed(self, text: str) -> list[Event]: ...

    def finish(self) -> list[Event]: ...


class ToolFormat(Protocol):
    name: str
    marker: str

    def full_grammar(self, tools: Sequence[ToolSpec], choice: ToolChoice, parallel: bool) -> str: ...

    def lazy_grammar(self, tools: Sequence[ToolSpec], parallel: bool) -> str: ...

    def parse(self, text: str, tools: Sequence[ToolSpec]) -> Parsed: ...

    def stream_parser(self, tools: Sequence[ToolSpec]) -> StreamParser: ...

    def prepare_messages(self, messages: Sequence[dict[str, Any]], tools: Sequence[ToolSpec]) -> list[dict[str, Any]]: ...


class HermesFormat:
    name = "hermes"
    marker = "<tool_call>"

    def full_grammar(self, tools: Sequence[ToolSpec], choice: ToolChoice, parallel: bool) -> str:
        raise NotImplementedError

    def lazy_grammar(self, tools: Sequence[ToolSpec], parallel: bool) -> str:
        raise NotImplementedError

    def parse(self, text: str, tools: Sequence[ToolSpec]) -> Parsed:
        raise NotImplementedError

    def stream_parser(self, tools: Sequence[ToolSpec]) -> StreamParser:
        raise NotImplementedError

    def prepare_messages(self, messages: Sequence[dict[str, Any]], tools: Sequence[ToolSpec]) -> list[dict[str, Any]]:
        raise NotImplementedError


class GenericFormat(HermesFormat):
    name = "generic"
    marker = ""


def detect_format(chat_template: str | None) -> ToolFormat:
    """Hermes when the template mentions <tool_call>, else generic."""
    return HermesFormat() if chat_template and "<tool_call>" in chat_template else GenericFormat()
