"""Stream and whole parse agree for every chunking (a seeded random over many chunkings, and
every single split point), and the stream's events keep OpenAI's order."""

from __future__ import annotations

import json
import random
from typing import Any, Sequence

import pytest

from capibara6.tools.events import CallArguments, CallStart, ContentDelta, Event
from capibara6.tools.formats import GenericFormat, HermesFormat
from capibara6.tools.reasoning import ReasoningSplitter, split_reasoning
from tests.tools.test_formats import ADD, PARIS, TOOLS, hermes_call

ODD = {"name": "get_weather", "arguments": {"city": "Sa\u00efda {\"x\"} ] \\ </tool_call>", "unit": "F"}}

HERMES_TEXTS = [
    "",
    "Plain answer, no calls.",
    "Ends with a partial marker <tool_",
    "Ends with spaces  \n\n",
    hermes_call(PARIS),
    "Let me look.\n\n" + hermes_call(PARIS) + "\n" + hermes_call(ADD),
    hermes_call(ODD) + "\nAnd some text after.",
    "a <tool_call> b <tool_call>\n" + json.dumps(ADD) + "\n</tool_call>",
    "<tool_call>\nnot json\n</tool_call> then " + hermes_call(ADD),
    hermes_call({"name": "unknown", "arguments": {}}),
    '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2',  # cut by max_tokens
    '<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_',  # cut inside the closing
    '<tool_call>\n{"name": "add", "arguments": {"a": 1}} trailing',
    "<tool_call><tool_call><<tool_call>",
    json.dumps(ADD),
    "```json\n" + json.dumps(ODD, indent=2) + "\n```\nDone.",
    "```\n" + json.dumps(ADD) + "\n``` then " + hermes_call(PARIS),
    json.dumps({"name": "add", "arguments": {"a": 1}})[:-4],
    '{"name": "nope", "arguments": {}}',
    "```python\nx = {1: 2}\n```",
    " {",
]
GENERIC_TEXTS = [
    "",
    json.dumps({"response": "plain"}),
    json.dumps({"response": "esc \\ \" \n \t \u00e9 \U0001F600 \ud83d"}),
    json.dumps({"response": "é \U0001F600"}, ensure_ascii=False),
    json.dumps({"response": "cut"})[:-3],
    json.dumps({"tool_calls": [PARIS]}),
    json.dumps({"tool_calls": [PARIS, ADD, ODD]}),
    json.dumps({"tool_calls": [ADD, {"name": "nope", "arguments": {}}]}),
    json.dumps({"tool_calls": [{"name": "nope", "arguments": {}}]}),
    json.dumps({"tool_calls": [ADD]})[:-5],
    "  free text, not the format",
    '{"response": "x"} and more',
    '{"respo',
    '{"response": "bad escape \\q and \\u12"}',
]


def chunkings(text: str, rng: random.Random, n: int) -> list[list[str]]:
    out = [[text], list(text)]
    out += [[text[:i], text[i:]] for i in range(len(text) + 1)]
    for _ in range(n):
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(1, 8))))
        out.append([text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])])
    return out


def run(parser: Any, chunks: Sequence[str]) -> list[Event]:
    events: list[Event] = []
    for chunk in chunks:
        events += parser.feed(chunk)
    return events + parser.finish()


def check_order(events: list[Event]) -> None:
    started = -1
    for ev in events:
        if isinstance(ev, CallStart):
            assert ev.index == started + 1 and ev.name
            started = ev.index
        elif isinstance(ev, CallArguments):
            assert ev.index == started and ev.fragment  # arguments only after their call's start
        else:
            assert isinstance(ev, ContentDelta) and ev.text


@pytest.mark.parametrize("fmt, texts", [(HermesFormat(), HERMES_TEXTS), (GenericFormat(), GENERIC_TEXTS)], ids=["hermes", "generic"])
def test_stream_agrees_with_the_whole_parse_for_every_chunking(fmt: Any, texts: list[str]) -> None:
    rng = random.Random(16)
    for text in texts:
        whole = fmt.parse(text, TOOLS)
        for chunks in chunkings(text, rng, 200):
            events = run(fmt.stream_parser(TOOLS), chunks)
            check_order(events)
            content = "".join(e.text for e in events if isinstance(e, ContentDelta))
            assert (content or None) == whole.content, (text, chunks)
            names = [e.name for e in events if isinstance(e, CallStart)]
            assert names == [c.name for c in whole.calls], (text, chunks)
            for i, call in enumerate(whole.calls):
                assert "".join(e.fragment for e in events if isinstance(e, CallArguments) and e.index == i) == call.arguments


def test_the_stream_announces_a_call_before_it_is_complete() -> None:
    """Name first, then arguments as they come: not held until the call closes."""
    parser = HermesFormat().stream_parser(TOOLS)
    assert parser.feed("Sure.") == [ContentDelta("Sure.")]
    assert parser.feed("\n<tool_c") == []  # maybe a marker, and the whitespace before it
    assert parser.feed('all>\n{"name": "add", "argu') == []
    events = parser.feed('ments": {"a": 1')
    assert [type(e) for e in events] == [CallStart, CallArguments] and events[1] == CallArguments(0, '{"a": 1')
    assert parser.feed(', "b": 2}}\n</tool_call>') == [CallArguments(0, ', "b": 2}')]
    assert parser.finish() == []


def test_generic_response_streams_decoded_text() -> None:
    parser = GenericFormat().stream_parser(TOOLS)
    assert parser.feed('{"response": "caf') == [ContentDelta("caf")]
    assert parser.feed("\\u00") == []
    assert parser.feed('e9 ok"}') == [ContentDelta("\u00e9 ok")]


REASONING_TEXTS = [
    ("", False), ("no thinking here", False), ("<think>\nI should add.\n</think>\n\nIt is 3.", False),
    ("  <think>a < b </thin", False), ("<think></think>answer", False), ("<thinking>is not a tag", False),
    ("already inside\n</think>\nanswer </think> stays", True), ("cut while thinking  ", True), ("<think", False),
]


def test_split_reasoning() -> None:
    assert split_reasoning("<think>\nI should add.\n</think>\n\nIt is 3.") == ("I should add.", "It is 3.")
    assert split_reasoning("plain") == (None, "plain")
    assert split_reasoning("inside </think> out", starts_thinking=True) == ("inside", "out")
    assert split_reasoning("<think>\n\n</think>\n\nhi") == (None, "hi")
    assert split_reasoning("<think>cut") == ("cut", "")
    assert split_reasoning("x <think>late</think>") == (None, "x <think>late</think>")


def test_reasoning_splitter_agrees_for_every_chunking() -> None:
    rng = random.Random(6)
    for text, starts in REASONING_TEXTS:
        reasoning, content = split_reasoning(text, starts)
        for chunks in chunkings(text, rng, 100):
            splitter = ReasoningSplitter(starts)
            parts = [splitter.feed(c) for c in chunks] + [splitter.finish()]
            assert "".join(r for r, _ in parts) == (reasoning or ""), (text, chunks)
            assert "".join(c for _, c in parts) == content, (text, chunks)


def test_reasoning_splitter_holds_back_a_partial_tag() -> None:
    splitter = ReasoningSplitter()
    assert splitter.feed("<thi") == ("", "")
    assert splitter.feed("nk>plan") == ("plan", "")
    assert splitter.feed(" </th") == ("", "")
    assert splitter.feed("ink> go") == ("", "go")
