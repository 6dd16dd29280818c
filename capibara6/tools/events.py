"""What a parsed answer is made of: the whole (Parsed) and the stream's events.

Invariants every format's parsers keep (tests/tools check them over random chunkings): the
ContentDelta texts concatenated are `Parsed.content` ("" standing for None); for each call,
CallStart comes first (OpenAI streams the id and `function.name` before any arguments) and its
CallArguments fragments concatenated are that call's `arguments`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence, Union

from .spec import ToolCall


@dataclass
class Parsed:
    """A whole answer: its text outside calls (None when there is none) and its calls in order."""

    content: str | None
    calls: list[ToolCall] = field(default_factory=list)


@dataclass(frozen=True)
class ContentDelta:
    text: str


@dataclass(frozen=True)
class CallStart:
    index: int  # the call's position in the answer: delta.tool_calls[i].index
    id: str
    name: str


@dataclass(frozen=True)
class CallArguments:
    index: int
    fragment: str  # a piece of the call's arguments JSON text


Event = Union[ContentDelta, CallStart, CallArguments]


def collect(events: Sequence[Event]) -> Parsed:
    """The whole answer a sequence of events describes."""
    content: list[str] = []
    calls: list[ToolCall] = []
    args: list[list[str]] = []
    for ev in events:
        if isinstance(ev, ContentDelta):
            content.append(ev.text)
        elif isinstance(ev, CallStart):
            calls.append(ToolCall(ev.id, ev.name, ""))
            args.append([])
        else:
            args[ev.index].append(ev.fragment)
    text = "".join(content)
    done = [ToolCall(c.id, c.name, "".join(a)) for c, a in zip(calls, args)]
    return Parsed(text or None, done)
