"""How a model writes tool calls, per chat template: the grammars that constrain them, the parsers
that read them back (whole and streamed) and the history they are shown.

Two formats:

- `HermesFormat` (Qwen2.5, Hermes, whose templates describe
  `<tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>`): the template renders the tools
  itself; a call opens with the marker `<tool_call>`, so under `auto` the model writes freely
  until the marker and is constrained from there (`lazy_grammar`). Parallel calls are separated
  by "\\n", as Qwen2.5's template renders them in the history.
- `GenericFormat` (templates with no tool support, e.g. our `gemma` format for Gemma 3): every
  answer is one JSON object, `{"tool_calls": [{"name": ..., "arguments": {...}}]}` or, under
  `auto`, `{"response": "text"}` (the shape of llama.cpp's generic chat handler); the tools and
  that contract are described in a system message we inject, and calls and results in the
  history are rendered as plain text turns in the same JSON.

Every call is `{"name": "<name>", "arguments": <arguments>}` in json.dumps' default layout, the
arguments under the tool's schema (capibara6/tools/schema_grammar.py), so a constrained call always
parses and validates. Grammar rules of tool i are prefixed `t<i>`; a schema that cannot be
enforced is a ToolError naming `tools[i].function.parameters`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, Sequence

from .events import CallArguments, CallStart, ContentDelta, Event, Parsed, collect
from .history import Message, normalize_history, text_of
from .reasoning import answer_start
from .schema_grammar import dumps, literal, schema_to_gbnf
from .spec import ToolChoice, ToolSpec
from .stream import NAME, WS, GenericStreamParser, HermesStreamParser, Match, Pattern, StreamParser, match

__all__ = [
    "CallArguments", "CallStart", "ContentDelta", "Event", "GenericFormat", "HermesFormat", "Parsed",
    "StreamParser", "ToolFormat", "Trigger", "detect_format",
]

TriggerKind = Literal["marker", "bare", "fenced"]


@dataclass(frozen=True)
class Trigger:
    """Where phase one of `auto` stops: text[:end] is kept, the rest of the call is generated
    under `lazy_grammar(tools, parallel, after=this)`. `name`: the tool a bare or fenced opening
    named (it ends right after the name's closing quote); None after the marker."""

    end: int
    kind: TriggerKind
    name: str | None = None

RESPONSE_OPEN = literal('{"response": ')
NAME_KEY = literal('{"name": ')  # the call object's layout: json.dumps' separators
CLOSE_BRACE = literal("}")
ARGUMENTS_KEY = literal(', "arguments": ')
JSON_STRING = r'"\"" ([^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4}))* "\""'


class ToolFormat(Protocol):
    name: str
    marker: str  # opens a call in free text; "" when every answer is constrained

    def full_grammar(self, tools: Sequence[ToolSpec], choice: ToolChoice, parallel: bool) -> str:
        """GBNF (start symbol `root`) for the whole answer under `required` / named (and `auto`
        for formats without a marker): one call, or 1..n if `parallel`."""
        ...

    def lazy_grammar(self, tools: Sequence[ToolSpec], parallel: bool, after: Trigger | None = None) -> str:
        """GBNF for what follows a trigger under `auto` (None: the marker): the rest of this
        call, its closing, more calls if `parallel` (after the marker only), then the grammar is
        complete (only end of generation is left)."""
        ...

    def trigger(self, text: str, tools: Sequence[ToolSpec], starts_thinking: bool = False) -> Trigger | None:
        """The first call opening in the answer so far, once it is certain; None before. Text
        inside a leading `<think>` block (as split_reasoning reads it) opens nothing."""
        ...

    def parse(self, text: str, tools: Sequence[ToolSpec]) -> Parsed: ...

    def stream_parser(self, tools: Sequence[ToolSpec]) -> StreamParser: ...

    def prepare_messages(self, messages: Sequence[Message], tools: Sequence[ToolSpec]) -> list[Message]:
        """The history for the chat template (calls decoded, results tied to their calls);
        ToolError names the message field at fault."""
        ...


def read_whole(parser: StreamParser, text: str) -> Parsed:
    """A whole answer read by the format's stream parser: the stream and the whole parse cannot disagree."""
    return collect(parser.feed(text) + parser.finish())


def call_rules(tools: Sequence[ToolSpec], only: str | None = None) -> tuple[list[str], str]:
    """The rules of each tool's call object (`t<i>-call`, its arguments `t<i>`) and an
    expression for "any one of them" (or only the tool named `only`).
    Indexes are the request's, so errors name `tools[i]`."""
    rules: list[str] = []
    alts: list[str] = []
    for i, tool in enumerate(tools):
        if only is not None and tool.name != only:
            continue
        args = f"t{i}"
        rules.extend(schema_to_gbnf(tool.parameters, args, f"tools[{i}].function.parameters"))
        rules.append(f"t{i}-call ::= {NAME_KEY} {literal(dumps(tool.name))} {ARGUMENTS_KEY} {args} {CLOSE_BRACE}")
        alts.append(f"t{i}-call")
    if not alts:
        raise ValueError(f"no tool named {only!r} among the tools")  # parse_tool_choice checked it
    return rules, " | ".join(alts)


def _only(choice: ToolChoice) -> str | None:
    if choice.mode == "none":
        raise ValueError("tool_choice 'none' has no call grammar")
    return choice.name if choice.mode == "named" else None


_NAMED: Pattern = ("{", WS, '"name"', WS, ":", WS, '"', NAME, '"')
BARE_OPENINGS: tuple[tuple[Pattern, TriggerKind], ...] = (
    ((WS, *_NAMED), "bare"),
    ((WS, "```json", WS, *_NAMED), "fenced"),
    ((WS, "```", WS, *_NAMED), "fenced"),
)


class HermesFormat:
    name = "hermes"
    marker = "<tool_call>"
    opening = "<tool_call>\n"
    closing = "\n</tool_call>"
    between = "\n"

    def _grammar(self, tools: Sequence[ToolSpec], only: str | None, root: str) -> str:
        rules, body = call_rules(tools, only)
        call = f'{literal(self.opening)} body {literal(self.closing)}'
        return "\n".join([f"root ::= {root}", f"call ::= {call}", f"body ::= {body}", *rules]) + "\n"

    def full_grammar(self, tools: Sequence[ToolSpec], choice: ToolChoice, parallel: bool) -> str:
        if choice.mode == "auto":
            raise ValueError("auto on the hermes format is generated free until the marker, then under lazy_grammar")
        more = f" ({literal(self.between)} call)*" if parallel else ""
        return self._grammar(tools, _only(choice), "call" + more)

    def lazy_grammar(self, tools: Sequence[ToolSpec], parallel: bool, after: Trigger | None = None) -> str:
        """After the marker: the rest of a marked call, then more if `parallel`. After a bare or
        fenced opening (the text ends with `"name": "<tool>"`): the rest of that one call object
        (and the fence's closing): the model chose to answer with one JSON call, and that is all."""
        if after is None or after.kind == "marker":
            first = f'{literal(self.opening[len(self.marker):])} body {literal(self.closing)}'
            more = f" ({literal(self.between)} call)*" if parallel else ""
            return self._grammar(tools, None, first + more)
        index = next((i for i, t in enumerate(tools) if t.name == after.name), None)
        if index is None:
            raise ValueError(f"the trigger names {after.name!r}, which is not among the tools")
        fence = " " + literal("\n```") if after.kind == "fenced" else ""
        rules = schema_to_gbnf(tools[index].parameters, f"t{index}", f"tools[{index}].function.parameters")
        root = f"{ARGUMENTS_KEY} t{index} {CLOSE_BRACE}{fence}"
        return "\n".join([f"root ::= {root}", *rules]) + "\n"

    def trigger(self, text: str, tools: Sequence[ToolSpec], starts_thinking: bool = False) -> Trigger | None:
        """The marker anywhere; or, at the answer's very start, a JSON object opening with
        `"name": "<one of the tools>"`, bare or in a ```json / ``` fence (how small Qwen2.5 models
        write calls). An object naming no tool (`{"name": "John"}`) is left alone. The answer
        starts after a leading thinking block; inside one, nothing opens a call."""
        start = answer_start(text, starts_thinking)
        if start is None:
            return None
        names = {t.name for t in tools}
        for pattern, kind in BARE_OPENINGS:
            found, end, name = match(text, start, pattern)
            if found is Match.OK and name in names:
                return Trigger(end, kind, name)
        k = text.find(self.marker, start)
        return Trigger(k + len(self.marker), "marker") if k >= 0 else None

    def parse(self, text: str, tools: Sequence[ToolSpec]) -> Parsed:
        return read_whole(self.stream_parser(tools), text)

    def stream_parser(self, tools: Sequence[ToolSpec]) -> StreamParser:
        return HermesStreamParser(tools)

    def prepare_messages(self, messages: Sequence[Message], tools: Sequence[ToolSpec]) -> list[Message]:
        """The template renders tools, calls and results itself: only decoded and checked here."""
        return normalize_history(messages)


class GenericFormat:
    name = "generic"
    marker = ""

    def full_grammar(self, tools: Sequence[ToolSpec], choice: ToolChoice, parallel: bool) -> str:
        rules, body = call_rules(tools, _only(choice))
        calls = literal('{"tool_calls": [') + " body" + (f' ({literal(", ")} body)*' if parallel else "") + " " + literal("]}")
        root = calls
        if choice.mode == "auto":
            root = f"{calls} | {RESPONSE_OPEN} answer {literal('}')}"
        return "\n".join([f"root ::= {root}", f"body ::= {body}", f"answer ::= {JSON_STRING}", *rules]) + "\n"

    def lazy_grammar(self, tools: Sequence[ToolSpec], parallel: bool, after: Trigger | None = None) -> str:
        raise ValueError("the generic format has no marker: every answer is under full_grammar")

    def trigger(self, text: str, tools: Sequence[ToolSpec], starts_thinking: bool = False) -> Trigger | None:
        return None  # every answer is constrained from its first token

    def parse(self, text: str, tools: Sequence[ToolSpec]) -> Parsed:
        return read_whole(self.stream_parser(tools), text)

    def stream_parser(self, tools: Sequence[ToolSpec]) -> StreamParser:
        return GenericStreamParser(tools)

    def prepare_messages(self, messages: Sequence[Message], tools: Sequence[ToolSpec]) -> list[Message]:
        """Plain turns only: the tools and the answer contract in the system message, an
        assistant's calls as the JSON object it would have answered, a tool result as a user
        turn `{"tool_response": {"name": ..., "tool_call_id": ..., "content": ...}}`."""
        out: list[Message] = []
        for msg in normalize_history(messages):
            if msg.get("role") == "assistant" and msg.get("tool_calls"):
                calls = [{"name": tc["function"]["name"], "arguments": tc["function"]["arguments"]} for tc in msg["tool_calls"]]
                said = text_of(msg.get("content"))
                out.append({"role": "assistant", "content": (said + "\n" if said else "") + dumps({"tool_calls": calls})})
            elif msg.get("role") == "tool":
                result = {"name": msg["name"], "tool_call_id": msg["tool_call_id"], "content": text_of(msg.get("content"))}
                out.append({"role": "user", "content": dumps({"tool_response": result})})
            else:
                out.append(msg)
        return _with_tools_described(out, tools) if tools else out


def describe_tools(tools: Sequence[ToolSpec]) -> str:
    """The system text of the generic format: the functions and the one-JSON-object contract."""
    lines = [dumps({"name": t.name, "description": t.description, "parameters": dict(t.parameters)}) for t in tools]
    return (
        "You can call these functions (their parameters are JSON Schemas):\n"
        + "\n".join(lines)
        + '\n\nAnswer with one JSON object only. To call functions: {"tool_calls": [{"name": "<function name>", "arguments": {<arguments>}}]}. '
        'To answer directly: {"response": "<your answer>"}.'
    )


def _with_tools_described(messages: list[Message], tools: Sequence[ToolSpec]) -> list[Message]:
    text = describe_tools(tools)
    if messages and messages[0].get("role") in ("system", "developer"):
        first = dict(messages[0])
        content = first.get("content")
        if isinstance(content, list):
            first["content"] = [*content, {"type": "text", "text": "\n\n" + text}]
        else:
            first["content"] = (text_of(content) + "\n\n" if text_of(content) else "") + text
        return [first, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def detect_format(chat_template: str | None) -> ToolFormat:
    """Hermes when the template mentions `<tool_call>` (it renders tools and calls that way),
    else generic."""
    return HermesFormat() if chat_template and "<tool_call>" in chat_template else GenericFormat()
