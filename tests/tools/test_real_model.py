"""Real generations under the tool grammars (Gemma 3 270M, greedy, one thread): whatever a small
base model wants to write, the call parses with our parser, names the tool and its arguments
validate against the tool's schema. The stream parser, fed the model's own token pieces, agrees
with the whole parse. Few and short: the box is shared."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import pytest

from capibara6.chat_templates import format_gemma
from capibara6.tools.events import CallArguments, CallStart, ContentDelta, Parsed, collect
from capibara6.tools.formats import GenericFormat, HermesFormat, ToolFormat
from capibara6.tools.spec import ToolChoice, ToolSpec, parse_tools

TOOLS = parse_tools([
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "minLength": 1, "maxLength": 24}, "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"]}}},
    {"type": "function", "function": {"name": "set_alarm", "description": "Set an alarm", "parameters": {
        "type": "object", "properties": {"hour": {"type": "integer", "minimum": 0, "maximum": 23}, "minute": {"type": "integer", "minimum": 0, "maximum": 59},
                                         "volume": {"type": "number", "minimum": 0, "maximum": 1}},
        "required": ["hour", "minute", "volume"]}}},
    {"type": "function", "function": {"name": "plan_trip", "description": "Plan a trip", "parameters": {
        "type": "object", "properties": {
            "stops": {"type": "array", "minItems": 1, "maxItems": 3, "items": {"type": "object", "properties": {
                "place": {"type": "string", "maxLength": 16}, "nights": {"type": "integer", "minimum": 1, "maximum": 9}}, "required": ["place", "nights"]}},
            "budget": {"type": "object", "properties": {"amount": {"type": "integer", "minimum": 0, "maximum": 99999}, "currency": {"const": "EUR"}},
                       "required": ["amount", "currency"]}},
        "required": ["stops", "budget"]}}},
])
SCHEMAS = {t.name: t.parameters for t in TOOLS}


@pytest.fixture(scope="module")
def llm(gemma_path: Path) -> Iterator[Any]:
    import llama_cpp

    model = llama_cpp.Llama(model_path=str(gemma_path), n_ctx=1024, n_threads=1, verbose=False)
    yield model
    model.close()


def generate(llm: Any, prompt: str, grammar: str) -> tuple[list[str], str]:
    from llama_cpp import LlamaGrammar

    pieces: list[str] = []
    finish = ""
    for chunk in llm.create_completion(prompt, grammar=LlamaGrammar.from_string(grammar, verbose=False), temperature=0.0,
                                       max_tokens=120, stream=True):
        pieces.append(chunk["choices"][0]["text"])
        finish = chunk["choices"][0]["finish_reason"] or finish
    return pieces, finish


def prompt_for(fmt: ToolFormat, question: str, tools: tuple[ToolSpec, ...]) -> str:
    messages = GenericFormat().prepare_messages([{"role": "user", "content": question}], tools)  # Gemma renders no tools itself
    return format_gemma(messages)[0]


def parsed_both_ways(fmt: ToolFormat, pieces: list[str]) -> Parsed:
    whole = fmt.parse("".join(pieces), TOOLS)
    parser = fmt.stream_parser(TOOLS)
    events = [e for p in pieces for e in parser.feed(p)] + parser.finish()
    streamed = collect(events)
    assert streamed.content == whole.content
    assert [(c.name, c.arguments) for c in streamed.calls] == [(c.name, c.arguments) for c in whole.calls]
    assert all(isinstance(e, (ContentDelta, CallStart, CallArguments)) for e in events)
    return whole


def assert_valid_calls(parsed: Parsed, names: set[str]) -> None:
    assert parsed.calls, parsed
    for call in parsed.calls:
        assert call.name in names
        jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])


@pytest.mark.parametrize(
    "choice, question",
    [
        (ToolChoice("required"), "What is the weather in Lisbon?"),
        (ToolChoice("named", "set_alarm"), "Wake me up at half past six, quietly."),
        (ToolChoice("named", "plan_trip"), "Plan two nights in Rome then three in Florence for 1500 euros."),
    ],
)
def test_generic_calls_under_the_grammar_validate(llm: Any, choice: ToolChoice, question: str) -> None:
    fmt = GenericFormat()
    pieces, finish = generate(llm, prompt_for(fmt, question, TOOLS), fmt.full_grammar(TOOLS, choice, parallel=False))
    assert finish == "stop", "".join(pieces)
    parsed = parsed_both_ways(fmt, pieces)
    assert parsed.content is None and len(parsed.calls) == 1
    assert_valid_calls(parsed, {choice.name} if choice.name else set(SCHEMAS))


def test_hermes_lazy_call_after_the_marker_validates(llm: Any) -> None:
    """`auto` on a marker format: the text so far ends with `<tool_call>`; the rest is generated
    under the lazy grammar and the whole answer parses into content and a valid call. Not
    parallel: with `parallel=True` this base model keeps opening calls until max_tokens (the
    grammar allows any number), which says nothing about the grammar."""
    fmt = HermesFormat()
    written = "I will check the forecast.\n" + fmt.marker
    pieces, finish = generate(llm, prompt_for(fmt, "Is it cold in Oslo?", TOOLS) + written, fmt.lazy_grammar(TOOLS, parallel=False))
    assert finish == "stop", "".join(pieces)
    parsed = parsed_both_ways(fmt, [written, *pieces])
    assert parsed.content == "I will check the forecast."
    assert_valid_calls(parsed, set(SCHEMAS))
