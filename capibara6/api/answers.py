"""A chat choice's raw text -> OpenAI's message fields: `content`, `reasoning_content`, `tool_calls`.

One `Shaper` per choice turns the text as it streams into chat deltas, in OpenAI's streaming
shape: a call opens with `delta.tool_calls[i]` carrying `index`, `id`, `type` and
`function.name` (arguments ""), then `function.arguments` fragments follow under the same
index. `message()` reads a whole answer the same way, so a streamed answer reassembles to the
non-streamed one. Without tools, tool history or thinking there is no run and the text is the
content, untouched.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..tool_use import ToolRun
from ..tools.formats import CallArguments, CallStart, ContentDelta, StreamParser
from ..tools.reasoning import ReasoningSplitter, split_reasoning

Delta = dict[str, Any]


@dataclass
class Shaper:
    """Streams one choice. Invariant: `calls` counts the calls opened so far."""

    run: ToolRun | None
    calls: int = 0
    _reasoning: ReasoningSplitter | None = field(default=None, init=False)
    _parser: StreamParser | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        run = self.run
        if run is not None and run.thinks:
            self._reasoning = ReasoningSplitter()
        if run is not None and run.calls_possible and run.request is not None:
            self._parser = run.format.stream_parser(run.request.specs)

    @property
    def plain(self) -> bool:
        return self._reasoning is None and self._parser is None

    def feed(self, text: str) -> list[Delta]:
        if self.plain:
            return [{"content": text}] if text else []
        thought, text = self._reasoning.feed(text) if self._reasoning is not None else ("", text)
        return self._shape(thought, self._parser.feed(text) if self._parser is not None else None, text)

    def finish(self) -> list[Delta]:
        if self.plain:
            return []
        thought, text = self._reasoning.finish() if self._reasoning is not None else ("", "")
        if self._parser is None:
            return self._shape(thought, None, text)
        events = self._parser.feed(text) if text else []
        return self._shape(thought, [*events, *self._parser.finish()], "")

    def _shape(self, thought: str, events: list[Any] | None, text: str) -> list[Delta]:
        out: list[Delta] = [{"reasoning_content": thought}] if thought else []
        if events is None:
            return out + ([{"content": text}] if text else [])
        for ev in events:
            if isinstance(ev, ContentDelta):
                if ev.text:
                    out.append({"content": ev.text})
            elif isinstance(ev, CallStart):
                self.calls = max(self.calls, ev.index + 1)
                out.append({"tool_calls": [{"index": ev.index, "id": ev.id, "type": "function",
                                            "function": {"name": ev.name, "arguments": ""}}]})
            elif isinstance(ev, CallArguments):
                if ev.fragment:
                    out.append({"tool_calls": [{"index": ev.index, "function": {"arguments": ev.fragment}}]})
        return out


def message(text: str, run: ToolRun | None) -> dict[str, Any]:
    """A whole answer as the assistant message of a chat completion."""
    if run is None:
        return {"role": "assistant", "content": text, "refusal": None}
    out: dict[str, Any] = {"role": "assistant"}
    if run.thinks:
        thought, text = split_reasoning(text)
        out["reasoning_content"] = thought
    if run.calls_possible and run.request is not None:
        parsed = run.format.parse(text, run.request.specs)
        out["content"] = parsed.content if parsed.content else (None if parsed.calls else "")
        if parsed.calls:
            out["tool_calls"] = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                                 for c in parsed.calls]
    else:
        out["content"] = text
    out["refusal"] = None
    return out


def finish_reason(reason: str | None, calls: int) -> str | None:
    """`tool_calls` when the answer made calls and was not cut by the token limit (OpenAI's rule)."""
    return "tool_calls" if calls and reason != "length" else reason
