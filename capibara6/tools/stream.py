"""Incremental parsers of tool-call answers: text in, content and call events out.

One parser serves both the stream and the whole answer (a format's `parse` feeds the whole text
at once), so the two cannot disagree. Chunking cannot change the result either: every decision
is made only once the text seen so far settles it for every continuation (a header has matched in
full or cannot match any more), and undecided text is held back, never emitted and retracted.

Leniency for unconstrained output, and its one limit: a call is recognised at its *header*, the
text up to the `{` that opens its arguments with a known tool's name in it. A marker whose header
does not match (prose after `<tool_call>`, an unknown name, arguments that are not an object)
stays content. Once the header matched, the call has been announced (CallStart) and its arguments
stream as they come, so a call cut short (max_tokens) keeps what was written and its arguments may
not parse (as OpenAI's can when cut by length). Under the grammars of
capibara6/tools/formats.py every call is well formed, and such a cut is the only way to get one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from enum import Enum
from typing import Callable, Sequence, Union

from .events import CallArguments, CallStart, ContentDelta, Event
from .spec import ToolSpec, new_call_id


class _Ws:
    """Pattern element: optional whitespace."""


class _Name:
    """Pattern element: a function name (its characters; the quotes are literals around it)."""


WS = _Ws()
NAME = _Name()
Pattern = Sequence[Union[str, _Ws, _Name]]
NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


class Match(Enum):
    OK = "ok"
    FAIL = "fail"
    MORE = "more"  # the text ends before the pattern is decided


def match(s: str, i: int, pattern: Pattern) -> tuple[Match, int, str | None]:
    """Match `pattern` at s[i:]: (OK, end, name) once it matched in full, FAIL once no
    continuation can match, MORE while the text is a proper prefix of a match. Patterns never end
    with WS, so OK never depends on text not seen yet."""
    name: str | None = None
    for el in pattern:
        if isinstance(el, _Ws):
            while i < len(s) and s[i].isspace():
                i += 1
            if i == len(s):
                return Match.MORE, i, None
        elif isinstance(el, _Name):
            j = i
            while j < len(s) and s[j] in NAME_CHARS and j - i <= 64:
                j += 1
            if j - i > 64:
                return Match.FAIL, i, None
            if j == len(s):
                return Match.MORE, i, None
            name, i = s[i:j], j
        else:
            n = min(len(el), len(s) - i)
            if s[i : i + n] != el[:n]:
                return Match.FAIL, i, None
            if n < len(el):
                return Match.MORE, i, None
            i += n
    return Match.OK, i, name


class ArgumentScanner:
    """Finds where a JSON object ends, one character at a time (strings and escapes tracked, so
    a brace inside a string does not count). Starts before the object's `{`."""

    def __init__(self) -> None:
        self.depth = 0
        self.in_string = False
        self.escaped = False

    def scan(self, s: str, i: int) -> tuple[int, bool]:
        """(end, done): s[i:end] belongs to the object; done when its closing brace is in it."""
        for j in range(i, len(s)):
            ch = s[j]
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif ch == "\\":
                    self.escaped = True
                elif ch == '"':
                    self.in_string = False
            elif ch == '"':
                self.in_string = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1
                if self.depth == 0:
                    return j + 1, True
        return len(s), False


class StreamParser(ABC):
    """Feed text as it is generated, get events. `finish()` once the answer is complete.

    Subclasses implement `_step(final)`: make one decision on `self.buf` from `self.pos`, return
    True when it made progress (so the loop steps again), False when it needs more text (or, when
    `final`, when nothing is left to decide)."""

    def __init__(self, tools: Sequence[ToolSpec], new_id: Callable[[], str] = new_call_id) -> None:
        self.names = frozenset(t.name for t in tools)
        self.new_id = new_id
        self.buf = ""
        self.pos = 0
        self.calls = 0
        self.args: ArgumentScanner | None = None
        self._events: list[Event] = []

    def feed(self, text: str) -> list[Event]:
        self.buf += text
        return self._run(final=False)

    def finish(self) -> list[Event]:
        return self._run(final=True)

    def _run(self, final: bool) -> list[Event]:
        while self._step(final):
            pass
        events, self._events = self._events, []
        return events

    @abstractmethod
    def _step(self, final: bool) -> bool:
        """One decision (see the class docstring); every format's parser defines it."""

    # -- helpers for the subclasses --------------------------------------------------------------

    def content(self, text: str) -> None:
        if text:
            self._events.append(ContentDelta(text))

    def start_call(self, name: str, args_at: int) -> None:
        """Announce a call; its arguments begin at buf[args_at] (the `{`)."""
        self._events.append(CallStart(self.calls, self.new_id(), name))
        self.calls += 1
        self.args = ArgumentScanner()
        self.pos = args_at

    def scan_arguments(self) -> bool:
        """Stream the current call's arguments; True once its object closed."""
        assert self.args is not None
        end, done = self.args.scan(self.buf, self.pos)
        if end > self.pos:
            self._events.append(CallArguments(self.calls - 1, self.buf[self.pos : end]))
        self.pos = end
        if done:
            self.args = None
        return done

    def skip_space(self) -> bool:
        """Drop whitespace at pos; True once a non-space character follows it."""
        while self.pos < len(self.buf) and self.buf[self.pos].isspace():
            self.pos += 1
        return self.pos < len(self.buf)


def held_back(s: str, marker: str) -> int:
    """How many trailing characters of `s` may still open a call: whitespace (dropped before a
    call) followed by a proper prefix of `marker`."""
    j = next((k for k in range(min(len(marker) - 1, len(s)), 0, -1) if s.endswith(marker[:k])), 0)
    t = s[: len(s) - j]
    return j + len(t) - len(t.rstrip())


class _H(Enum):
    START = 0  # the answer's start: a bare or fenced JSON call?
    OUTSIDE = 1  # content, looking for the marker
    HEADER = 2  # after the marker: is it a call?
    ARGS = 3
    CLOSE = 4  # after the arguments: "}" and "</tool_call>"
    AFTER = 5  # after a call: whitespace is dropped


CALL_HEAD: Pattern = ("{", WS, '"name"', WS, ":", WS, '"', NAME, '"', WS, ",", WS, '"arguments"', WS, ":", WS, "{")
HERMES_HEADER: Pattern = (WS, *CALL_HEAD)
# A call the model writes without the marker, as the whole answer's start: small Qwen2.5 models
# answer `{"name": ...}` or a ```json fence rather than `<tool_call>` (Qwen2.5-Coder-0.5B, greedy,
# its own template with two tools: 4 calls of 4 in free text had no marker). llama.cpp's hermes
# handler accepts the same openings.
OPENINGS: tuple[tuple[Pattern, Pattern], ...] = (  # (header, closing)
    ((WS, *CALL_HEAD), (WS, "}")),
    ((WS, "```json", WS, *CALL_HEAD), (WS, "}", WS, "```")),
    ((WS, "```", WS, *CALL_HEAD), (WS, "}", WS, "```")),
)


class HermesStreamParser(StreamParser):
    """`text <tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call> ...`: content is the
    text outside calls, without the whitespace next to a call (so `text\\n\\n<tool_call>` gives
    content "text"); a marker whose header does not match stays content, marker included. An
    answer that starts with a call object, bare or in a ``` fence, starts with that call."""

    marker = "<tool_call>"
    marked: Pattern = (WS, "}", WS, "</tool_call>")

    def __init__(self, tools: Sequence[ToolSpec], new_id: Callable[[], str] = new_call_id) -> None:
        super().__init__(tools, new_id)
        self.state = _H.START
        self.held_from = 0  # where the whitespace before a tentative marker starts
        self.closing = self.marked

    def _step(self, final: bool) -> bool:
        if self.state is _H.START:
            return self._start(final)
        if self.state is _H.OUTSIDE:
            return self._outside(final)
        if self.state is _H.HEADER:
            return self._header(final)
        if self.state is _H.ARGS:
            if self.scan_arguments():
                self.state = _H.CLOSE
                return True
            return False
        if self.state is _H.CLOSE:
            return self._close(final)
        if self.skip_space():
            self.state = _H.OUTSIDE
            return True
        return False

    def _outside(self, final: bool) -> bool:
        s = self.buf[self.pos :]
        k = s.find(self.marker)
        if k >= 0:
            before = s[:k].rstrip()
            self.content(before)
            self.held_from = self.pos + len(before)
            self.pos += k + len(self.marker)
            self.state = _H.HEADER
            return True
        keep = 0 if final else held_back(s, self.marker)
        self.content(s[: len(s) - keep])
        self.pos += len(s) - keep
        return False

    def _start(self, final: bool) -> bool:
        undecided = False
        for header, closing in OPENINGS:
            found, end, name = match(self.buf, 0, header)
            if found is Match.OK and name in self.names:
                assert name is not None
                self.start_call(name, end - 1)
                self.closing, self.state = closing, _H.ARGS
                return True
            undecided = undecided or found is Match.MORE
        if undecided and not final:
            return False
        self.state = _H.OUTSIDE
        return True

    def _header(self, final: bool) -> bool:
        found, end, name = match(self.buf, self.pos, HERMES_HEADER)
        if found is Match.MORE and not final:
            return False
        if found is Match.OK and name in self.names:
            assert name is not None
            self.start_call(name, end - 1)
            self.closing, self.state = self.marked, _H.ARGS
            return True
        self.content(self.buf[self.held_from : self.pos])  # not a call: the marker is text
        self.state = _H.OUTSIDE
        return True

    def _close(self, final: bool) -> bool:
        found, end, _ = match(self.buf, self.pos, self.closing)
        if found is Match.MORE:
            if not final:
                return False
            self.pos = len(self.buf)  # an answer cut inside the closing: the closing is syntax
        elif found is Match.OK:
            self.pos = end
        self.state = _H.AFTER  # on FAIL the call ends at its arguments; what follows is content
        return True


class _G(Enum):
    START = 1
    PLAIN = 2  # not the format's JSON: everything is content
    RESPONSE = 3  # inside the "response" string
    TAIL = 4  # after the object: whitespace dropped, the rest is content
    ITEM = 5  # expecting a call object
    ARGS = 6
    ITEM_END = 7


RESPONSE_HEAD: Pattern = (WS, "{", WS, '"response"', WS, ":", WS, '"')
CALLS_HEAD: Pattern = (WS, "{", WS, '"tool_calls"', WS, ":", WS, "[")
ITEM_HEAD: Pattern = (WS, "{", WS, '"name"', WS, ":", WS, '"', NAME, '"', WS, ",", WS, '"arguments"', WS, ":", WS, "{")
NEXT_ITEM: Pattern = (WS, "}", WS, ",")
LAST_ITEM: Pattern = (WS, "}", WS, "]", WS, "}")
RESPONSE_END: Pattern = (WS, "}")
ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}


class GenericStreamParser(StreamParser):
    """The generic format's one JSON object: `{"response": "text"}` streams the decoded string as
    content; `{"tool_calls": [{"name": "f", "arguments": {...}}, ...]}` streams the calls. Text
    that is neither is content as written; so is the rest after a call that does not parse."""

    def __init__(self, tools: Sequence[ToolSpec], new_id: Callable[[], str] = new_call_id) -> None:
        super().__init__(tools, new_id)
        self.state = _G.START
        self.plain_from = 0  # where content starts if the calls stop parsing

    def _step(self, final: bool) -> bool:
        state = self.state
        if state is _G.START:
            return self._start(final)
        if state is _G.PLAIN:
            self.content(self.buf[self.plain_from :])
            self.plain_from = self.pos = len(self.buf)
            return False
        if state is _G.RESPONSE:
            return self._response()
        if state is _G.TAIL:
            if self.skip_space():
                self._plain(self.pos)
                return True
            return False
        if state is _G.ITEM:
            return self._item(final)
        if state is _G.ARGS:
            if self.scan_arguments():
                self.plain_from = self.pos
                self.state = _G.ITEM_END
                return True
            return False
        return self._item_end(final)

    def _plain(self, at: int) -> None:
        self.plain_from = self.pos = at
        self.state = _G.PLAIN

    def _start(self, final: bool) -> bool:
        results = [(match(self.buf, self.pos, head), state) for head, state in ((RESPONSE_HEAD, _G.RESPONSE), (CALLS_HEAD, _G.ITEM))]
        for (found, end, _), state in results:
            if found is Match.OK:
                self.pos, self.state = end, state
                return True
        if any(found is Match.MORE for (found, _, _), _ in results) and not final:
            return False
        self._plain(0)
        return True

    def _response(self) -> bool:
        """Decode the string up to the last complete escape (a high surrogate waits for its pair)."""
        s, i = self.buf, self.pos
        out: list[str] = []
        while i < len(s):
            ch = s[i]
            if ch == '"':
                self.content("".join(out))
                self.pos, self.state = i + 1, _G.TAIL
                found, end, _ = match(s, self.pos, RESPONSE_END)
                if found is Match.OK:
                    self.pos = end
                elif found is Match.MORE:  # wait for the closing brace before the tail
                    self.state = _G.RESPONSE
                    self.pos = i
                    return False
                return True
            if ch != "\\":
                out.append(ch)
                i += 1
                continue
            text, used = _escape(s, i)
            if used == 0:
                break
            out.append(text)
            i += used
        self.content("".join(out))
        self.pos = i
        return False

    def _item(self, final: bool) -> bool:
        found, end, name = match(self.buf, self.pos, ITEM_HEAD)
        if found is Match.MORE and not final:
            return False
        if found is Match.OK and name in self.names:
            assert name is not None
            self.start_call(name, end - 1)
            self.state = _G.ARGS
            return True
        self._plain(self.plain_from)
        return True

    def _item_end(self, final: bool) -> bool:
        more = False
        for pattern, state in ((NEXT_ITEM, _G.ITEM), (LAST_ITEM, _G.TAIL)):
            found, end, _ = match(self.buf, self.pos, pattern)
            if found is Match.OK:
                self.pos, self.state = end, state
                return True
            more = more or found is Match.MORE
        if more and not final:
            return False
        if more:  # cut inside the closing: it is syntax
            self.pos = self.plain_from = len(self.buf)
        self._plain(self.plain_from)
        return True


def _escape(s: str, i: int) -> tuple[str, int]:
    """The JSON escape at s[i] (a backslash): (text, characters used), or ("", 0) while it is
    incomplete. An unknown escape is kept as written; a surrogate pair becomes one character, a lone
    surrogate U+FFFD."""
    if i + 1 >= len(s):
        return "", 0
    kind = s[i + 1]
    if kind in ESCAPES:
        return ESCAPES[kind], 2
    if kind != "u":
        return s[i : i + 2], 2
    hexa = _hex_run(s, i + 2)
    if len(hexa) < 4:  # incomplete while the text ends within it, else kept as written
        return ("", 0) if i + 2 + len(hexa) == len(s) else (s[i : i + 2 + len(hexa)], 2 + len(hexa))
    code = int(hexa, 16)
    if 0xD800 <= code < 0xDC00:  # a high surrogate: its low half must follow
        if s[i + 6 : i + 8] == "\\u":
            low = _hex_run(s, i + 8)
            if len(low) == 4 and 0xDC00 <= int(low, 16) < 0xE000:
                return chr(0x10000 + ((code - 0xD800) << 10) + (int(low, 16) - 0xDC00)), 12
            if len(low) < 4 and i + 8 + len(low) == len(s):
                return "", 0
        elif "\\u".startswith(s[i + 6 : i + 8]) and i + 8 > len(s):  # the pair's "\\u" not all seen yet
            return "", 0
    if 0xD800 <= code < 0xE000:  # a lone surrogate cannot be encoded as UTF-8: the replacement character
        return "\ufffd", 6
    return chr(code), 6


def _hex_run(s: str, i: int) -> str:
    """Up to 4 hex digits at s[i:]."""
    j = i
    while j < len(s) and j - i < 4 and s[j] in "0123456789abcdefABCDEF":
        j += 1
    return s[i:j]
