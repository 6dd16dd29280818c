"""Qwen2.5-Coder-0.5B-Instruct with its own GGUF template (the hermes format): `auto` in two
phases exactly as a server runs it (free until `trigger`, then `lazy_grammar(after=trigger)`),
and `required`; every call validates against its schema. Greedy, one thread, short answers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import pytest

from capibara6.chat_templates import jinja_formatter
from capibara6.gguf_header import read_header
from capibara6.tools.formats import HermesFormat, detect_format
from capibara6.tools.reasoning import template_thinks
from capibara6.tools.spec import ToolChoice, parse_tools

RAW_TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 40}, "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "add", "description": "Add two integers", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}},
]
TOOLS = parse_tools(RAW_TOOLS)
SCHEMAS = {t.name: t.parameters for t in TOOLS}


@pytest.fixture(scope="module")
def qwen(qwen_path: Path) -> Iterator[tuple[Any, str]]:
    import llama_cpp

    template = read_header(qwen_path).metadata["tokenizer.chat_template"]
    model = llama_cpp.Llama(model_path=str(qwen_path), n_ctx=1024, n_threads=1, verbose=False)
    yield model, template
    model.close()


def prompt(template: str, question: str) -> str:
    messages = HermesFormat().prepare_messages([{"role": "user", "content": question}], TOOLS)
    return jinja_formatter(template, "", "<|im_end|>")(messages, RAW_TOOLS)[0]


def auto(llm: Any, template: str, question: str) -> str:
    """The answer under `auto`: phase one free (streamed) until a call opens, phase two under the
    lazy grammar from the prompt plus the text kept."""
    from llama_cpp import LlamaGrammar

    fmt, text = HermesFormat(), prompt(template, question)
    seen = ""
    for chunk in llm.create_completion(text, temperature=0.0, max_tokens=60, stop=["<|im_end|>"], stream=True):
        seen += chunk["choices"][0]["text"]
        trig = fmt.trigger(seen, TOOLS)
        if trig is not None:
            kept = seen[: trig.end]
            grammar = LlamaGrammar.from_string(fmt.lazy_grammar(TOOLS, parallel=True, after=trig), verbose=False)
            out = llm.create_completion(text + kept, grammar=grammar, temperature=0.0, max_tokens=80)
            assert out["choices"][0]["finish_reason"] == "stop"
            return kept + out["choices"][0]["text"]
    return seen


def test_the_template_is_the_hermes_format(qwen: tuple[Any, str]) -> None:
    _, template = qwen
    assert detect_format(template).name == "hermes" and not template_thinks(template)


def test_auto_calls_a_relevant_tool_and_answers_otherwise(qwen: tuple[Any, str]) -> None:
    llm, template = qwen
    fmt = HermesFormat()
    called = fmt.parse(auto(llm, template, "What is 17 plus 25?"), TOOLS)
    assert [c.name for c in called.calls] == ["add"] and called.content is None
    jsonschema.validate(json.loads(called.calls[0].arguments), SCHEMAS["add"])
    answered = fmt.parse(auto(llm, template, "Write a haiku about rivers."), TOOLS)
    assert answered.calls == [] and answered.content


def test_required_calls_validate(qwen: tuple[Any, str]) -> None:
    from llama_cpp import LlamaGrammar

    llm, template = qwen
    fmt = HermesFormat()
    grammar = LlamaGrammar.from_string(fmt.full_grammar(TOOLS, ToolChoice("required"), parallel=True), verbose=False)
    out = llm.create_completion(prompt(template, "What's the weather in Paris?"), grammar=grammar, temperature=0.0, max_tokens=80)
    assert out["choices"][0]["finish_reason"] == "stop"
    parsed = fmt.parse(out["choices"][0]["text"], TOOLS)
    assert parsed.calls and all(c.name == "get_weather" for c in parsed.calls)
    for call in parsed.calls:
        jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])
