"""The hermes and generic formats: their grammars (by llama.cpp's sampler), their parsers on
whole answers, and the history they hand the template."""

from __future__ import annotations

import json
from typing import Any

import pytest

from capibara6.tools.formats import GenericFormat, HermesFormat, Trigger, detect_format
from capibara6.tools.spec import ToolChoice, ToolError, parse_tools
from tests.tools.conftest import GrammarChecker

TOOLS = parse_tools([
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                      "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
                                                     "required": ["city"]}}},
    {"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                                                                   "required": ["a", "b"]}}},
])
PARIS = {"name": "get_weather", "arguments": {"city": "Paris"}}
ADD = {"name": "add", "arguments": {"a": 1, "b": 2}}


def hermes_call(call: dict[str, Any]) -> str:
    """A call as Qwen2.5's template renders it in the history."""
    return f"<tool_call>\n{json.dumps(call)}\n</tool_call>"


def test_detect_format_follows_the_template() -> None:
    assert detect_format("{% for tool in tools %}<tool_call>{% endfor %}").name == "hermes"
    assert detect_format("{{ messages }}").name == "generic"
    assert detect_format(None).name == "generic"


def test_hermes_full_grammar(grammar_checker: GrammarChecker) -> None:
    fmt = HermesFormat()
    one = fmt.full_grammar(TOOLS, ToolChoice("required"), parallel=False)
    many = fmt.full_grammar(TOOLS, ToolChoice("required"), parallel=True)
    named = fmt.full_grammar(TOOLS, ToolChoice("named", "add"), parallel=False)
    assert grammar_checker.accepts(one, hermes_call(PARIS))
    assert grammar_checker.accepts(one, hermes_call(ADD))
    assert not grammar_checker.accepts(one, hermes_call(PARIS) + "\n" + hermes_call(ADD))
    assert grammar_checker.accepts(many, hermes_call(PARIS) + "\n" + hermes_call(ADD))
    assert grammar_checker.accepts(named, hermes_call(ADD))
    assert not grammar_checker.accepts(named, hermes_call(PARIS))
    assert not grammar_checker.accepts(one, "Sure. " + hermes_call(PARIS))
    assert not grammar_checker.accepts(one, hermes_call({"name": "add", "arguments": {"a": 1}}))


def test_hermes_lazy_grammar_continues_after_the_marker(grammar_checker: GrammarChecker) -> None:
    fmt = HermesFormat()
    rest = hermes_call(PARIS)[len(fmt.marker):]
    one = fmt.lazy_grammar(TOOLS, parallel=False)
    many = fmt.lazy_grammar(TOOLS, parallel=True)
    assert grammar_checker.accepts(one, rest)
    assert not grammar_checker.accepts(one, rest + "\n" + hermes_call(ADD))
    assert grammar_checker.accepts(many, rest + "\n" + hermes_call(ADD))
    assert not grammar_checker.accepts(one, rest + " more text")
    with pytest.raises(ValueError):
        fmt.full_grammar(TOOLS, ToolChoice("auto"), parallel=True)


def test_generic_grammar(grammar_checker: GrammarChecker) -> None:
    fmt = GenericFormat()
    auto = fmt.full_grammar(TOOLS, ToolChoice("auto"), parallel=True)
    required = fmt.full_grammar(TOOLS, ToolChoice("required"), parallel=False)
    assert grammar_checker.accepts(auto, json.dumps({"response": "It is \"sunny\".\nBye"}))
    assert grammar_checker.accepts(auto, json.dumps({"tool_calls": [PARIS, ADD]}))
    assert grammar_checker.accepts(required, json.dumps({"tool_calls": [ADD]}))
    assert not grammar_checker.accepts(required, json.dumps({"tool_calls": [PARIS, ADD]}))
    assert not grammar_checker.accepts(required, json.dumps({"response": "no"}))
    assert not grammar_checker.accepts(required, json.dumps({"tool_calls": []}))


def test_a_tool_schema_the_grammar_cannot_enforce_names_its_tool() -> None:
    tools = parse_tools([TOOLS_RAW_OK, {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"s": {"type": "string", "pattern": "x"}}}}}])
    for grammar in (lambda: HermesFormat().lazy_grammar(tools, True), lambda: GenericFormat().full_grammar(tools, ToolChoice("auto"), True)):
        with pytest.raises(ToolError) as info:
            grammar()
        assert info.value.param == "tools[1].function.parameters" and "'/s'" in str(info.value)


TOOLS_RAW_OK = {"type": "function", "function": {"name": "ok"}}


def test_hermes_parse_content_and_calls() -> None:
    text = "Let me check.\n\n" + hermes_call(PARIS) + "\n" + hermes_call(ADD)
    parsed = HermesFormat().parse(text, TOOLS)
    assert parsed.content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in parsed.calls] == [("get_weather", {"city": "Paris"}), ("add", {"a": 1, "b": 2})]
    assert parsed.calls[0].id != parsed.calls[1].id and all(c.id.startswith("call_") for c in parsed.calls)


@pytest.mark.parametrize(
    "text",
    [
        "I would use <tool_call> here, but no.",
        "<tool_call>\nnot json\n</tool_call>",
        hermes_call({"name": "unknown_tool", "arguments": {}}),
        '<tool_call>\n{"name": "add", "arguments": "{\\"a\\": 1}"}\n</tool_call>',
        "Just an answer.",
    ],
)
def test_hermes_malformed_calls_stay_content(text: str) -> None:
    parsed = HermesFormat().parse(text, TOOLS)
    assert parsed.calls == [] and parsed.content == text


def test_hermes_lenient_layout_and_a_cut_call() -> None:
    loose = '<tool_call>{ "name" : "add",\n"arguments":{"a": 1,"b":2} }</tool_call> done'
    parsed = HermesFormat().parse(loose, TOOLS)
    assert [c.arguments for c in parsed.calls] == ['{"a": 1,"b":2}'] and parsed.content == "done"
    cut = HermesFormat().parse('<tool_call>\n{"name": "add", "arguments": {"a": 1, "b', TOOLS)
    assert cut.content is None and [(c.name, c.arguments) for c in cut.calls] == [("add", '{"a": 1, "b')]


def test_generic_parse() -> None:
    fmt = GenericFormat()
    calls = fmt.parse(json.dumps({"tool_calls": [PARIS, ADD]}), TOOLS)
    assert calls.content is None and [json.loads(c.arguments) for c in calls.calls] == [{"city": "Paris"}, {"a": 1, "b": 2}]
    answer = fmt.parse(json.dumps({"response": "caf\u00e9 \U0001F600 \"ok\"\n"}), TOOLS)
    assert answer.content == "caf\u00e9 \U0001F600 \"ok\"\n" and answer.calls == []
    assert fmt.parse("not json at all", TOOLS).content == "not json at all"
    bad = json.dumps({"tool_calls": [{"name": "nope", "arguments": {}}]})
    assert fmt.parse(bad, TOOLS).content == bad


# -- history --------------------------------------------------------------------------------------

def history() -> list[dict[str, Any]]:
    return [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"},
    ]


def test_hermes_history_decodes_arguments_and_names_results() -> None:
    msgs = history()
    out = HermesFormat().prepare_messages(msgs, TOOLS)
    assert out[2]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert out[3]["name"] == "get_weather" and out[3]["content"] == "18 C, sunny"
    assert msgs == history()  # the request is not changed


@pytest.mark.parametrize("fmt", [HermesFormat(), GenericFormat()], ids=["hermes", "generic"])
@pytest.mark.parametrize(
    "edit, param",
    [
        (lambda m: m[3].update(tool_call_id="call_2"), "messages[3].tool_call_id"),
        (lambda m: m[3].pop("tool_call_id"), "messages[3].tool_call_id"),
        (lambda m: m.insert(1, {"role": "tool", "tool_call_id": "call_1", "content": "early"}), "messages[1].tool_call_id"),
        (lambda m: m[2]["tool_calls"][0]["function"].update(arguments="{oops"), "messages[2].tool_calls[0].function.arguments"),
        (lambda m: m[2]["tool_calls"][0]["function"].update(arguments="[1]"), "messages[2].tool_calls[0].function.arguments"),
        (lambda m: m[2]["tool_calls"][0].pop("id"), "messages[2].tool_calls[0].id"),
    ],
)
def test_bad_history_names_the_field(fmt: Any, edit: Any, param: str) -> None:
    msgs = history()
    edit(msgs)
    with pytest.raises(ToolError) as info:
        fmt.prepare_messages(msgs, TOOLS)
    assert info.value.param == param


def test_generic_history_is_plain_turns_with_the_tools_described() -> None:
    out = GenericFormat().prepare_messages(history(), TOOLS)
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    assert out[0]["content"].startswith("Be brief.\n\n") and '"name": "get_weather"' in out[0]["content"]
    assert '{"response": ' in out[0]["content"] and '{"tool_calls": ' in out[0]["content"]
    assert json.loads(out[2]["content"]) == {"tool_calls": [PARIS]}
    assert json.loads(out[3]["content"]) == {"tool_response": {"name": "get_weather", "tool_call_id": "call_1", "content": "18 C, sunny"}}
    plain = GenericFormat().prepare_messages([{"role": "user", "content": "hi"}], TOOLS)
    assert plain[0]["role"] == "system" and plain[1] == {"role": "user", "content": "hi"}
    assert GenericFormat().prepare_messages([{"role": "user", "content": "hi"}], ()) == [{"role": "user", "content": "hi"}]


# -- calls written without the marker (what small Qwen2.5 models do) ------------------------------

BARE = json.dumps(ADD)
FENCED = "```json\n" + json.dumps(ADD, indent=2) + "\n```"


@pytest.mark.parametrize("text", [BARE, "  " + BARE + "\n", FENCED, "```\n" + BARE + "\n```"])
def test_an_answer_that_is_a_call_object_is_a_call(text: str) -> None:
    parsed = HermesFormat().parse(text, TOOLS)
    assert parsed.content is None and [(c.name, json.loads(c.arguments)) for c in parsed.calls] == [("add", {"a": 1, "b": 2})]


@pytest.mark.parametrize("text", ["Here: " + BARE, json.dumps({"city": "Paris"}), json.dumps({"name": "nope", "arguments": {}}), "```python\nprint(1)\n```"])
def test_a_call_object_only_counts_at_the_start_and_with_a_known_name(text: str) -> None:
    parsed = HermesFormat().parse(text, TOOLS)
    assert parsed.calls == [] and parsed.content == text


def test_triggers() -> None:
    fmt = HermesFormat()
    assert fmt.trigger("Let me see", TOOLS) is None
    assert fmt.trigger('{"name": "ad', TOOLS) is None  # not decided yet
    assert fmt.trigger('{"city"', TOOLS) is None
    assert fmt.trigger('{"name": "John"', TOOLS) is None  # a JSON answer, not a call
    assert fmt.trigger("Sure <tool_call>\n{", TOOLS) == Trigger(len("Sure <tool_call>"), "marker")
    assert fmt.trigger(' {\n  "name": "add"', TOOLS) == Trigger(len(' {\n  "name": "add"'), "bare", "add")
    assert fmt.trigger('```json\n{\n  "name":"add"', TOOLS) == Trigger(len('```json\n{\n  "name":"add"'), "fenced", "add")
    assert fmt.trigger('Text then {"name": "add"', TOOLS) is None
    assert GenericFormat().trigger(BARE, TOOLS) is None


@pytest.mark.parametrize("written", ['{"name": "add"', '```json\n{\n  "name": "add"'])
def test_lazy_grammar_after_a_bare_opening(grammar_checker: GrammarChecker, written: str) -> None:
    fmt = HermesFormat()
    trig = fmt.trigger(written, TOOLS)
    assert trig is not None and trig.end == len(written)
    grammar = fmt.lazy_grammar(TOOLS, parallel=True, after=trig)
    rest = ', "arguments": {"a": 1, "b": 2}}' + ("\n```" if trig.kind == "fenced" else "")
    assert grammar_checker.accepts(grammar, rest)
    assert not grammar_checker.accepts(grammar, ', "arguments": {"a": 1}}')
    assert not grammar_checker.accepts(grammar, ', "arguments": {"city": "Paris"}}')  # the named tool's schema only
    assert not grammar_checker.accepts(grammar, rest + "\n" + hermes_call(ADD))  # one bare call, then the end
    parsed = fmt.parse(written + rest, TOOLS)
    assert parsed.content is None and [(c.name, json.loads(c.arguments)) for c in parsed.calls] == [("add", {"a": 1, "b": 2})]


def test_history_rendered_by_a_hermes_template_reads_back_as_the_same_calls() -> None:
    """prepare_messages decodes the arguments; a Qwen2.5-style template renders each call as
    `<tool_call>\\n{"name": ..., "arguments": <tojson>}\\n</tool_call>`; our parser reads that
    text back as the calls sent, in the layout the grammar generates."""
    from capibara6.chat_templates import render_template

    template = (
        "{%- for m in messages %}{%- if m.role == 'assistant' and m.tool_calls %}<|a|>"
        "{%- for tc in m.tool_calls %}{%- set f = tc.function %}"
        "{{- '\\n<tool_call>\\n{\"name\": \"' + f.name + '\", \"arguments\": ' + (f.arguments | tojson) + '}\\n</tool_call>' }}"
        "{%- endfor %}<|end|>{%- endif %}{%- endfor %}"
    )
    msgs = history()
    msgs[2]["tool_calls"].append({"id": "call_2", "type": "function", "function": {"name": "add", "arguments": '{"a": 1,"b":2}'}})
    rendered = render_template(template, HermesFormat().prepare_messages(msgs, TOOLS))
    answer = rendered.split("<|a|>")[1].split("<|end|>")[0]
    parsed = HermesFormat().parse(answer, TOOLS)
    assert parsed.content is None
    assert [(c.name, c.arguments) for c in parsed.calls] == [("get_weather", '{"city": "Paris"}'), ("add", '{"a": 1, "b": 2}')]


def test_nothing_inside_a_thinking_block_opens_a_call() -> None:
    fmt = HermesFormat()
    assert fmt.trigger("<think>maybe <tool_call> or {", TOOLS) is None
    assert fmt.trigger('<think>plan</think>\n{"name": "add"', TOOLS) == Trigger(len('<think>plan</think>\n{"name": "add"'), "bare", "add")
    assert fmt.trigger("plan</think><tool_call>", TOOLS, starts_thinking=True) == Trigger(len("plan</think><tool_call>"), "marker")
    assert fmt.trigger("plan <tool_call>", TOOLS, starts_thinking=True) is None
