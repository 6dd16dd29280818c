"""Tool calling through real HTTP and the real `openai` client, on Qwen2.5-Coder-0.5B-Instruct
(its GGUF's own template, Hermes `<tool_call>` format) and on Gemma 3 (no tool markup: the
generic JSON format), plus scripted backends for the two-phase `auto` run and thinking.

What could fail here: a call that does not parse or does not validate against its schema, a
streamed call that does not reassemble to the non-streamed one, a history with calls and tool
results that does not reach the model, a refusal that names the wrong field.
"""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Any, Iterator

import gguf
import httpx
import jsonschema
import openai
import pytest
from openai import OpenAI

from capibara6.api.app import AppState, create_app
from capibara6.config import ServerSettings, parse_registry
from capibara6.pool import ModelPool
from capibara6.types import GenerationOutcome, Prepared, SamplingParams, TextPrompt, TokenEvent
from tests.conftest import gemma_registry
from tests.fakes import FakeBackendBase
from tests.serverproc import ServerProcess

QWEN = "qwen2.5-coder-0.5b"
GEMMA = "gemma3-270m"
NATIVE = "qwen2.5-coder-0.5b-native"


def fn(name: str, description: str, properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    schema = {"type": "object", "properties": properties, "required": required, "additionalProperties": False}
    return {"type": "function", "function": {"name": name, "description": description, "parameters": schema}}


WEATHER = fn("get_weather", "Current weather in a city.",
             {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, ["city", "unit"])
ADD = fn("add", "Add two numbers.", {"a": {"type": "number"}, "b": {"type": "integer"}}, ["a", "b"])
ORDER = fn("place_order", "Order items for a customer.", {
    "customer": {"type": "object", "properties": {"name": {"type": "string"}, "vip": {"type": "boolean"}},
                 "required": ["name", "vip"], "additionalProperties": False},
    "items": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 3},
}, ["customer", "items"])
TOOLS = [WEATHER, ADD, ORDER]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris right now, in celsius?"}]


@pytest.fixture(scope="module")
def srv(qwen_path: Path, gemma_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    # parallel 2: the batched backend (the default registry runs Qwen with parallel 4)
    qwen = {"backend": "llamacpp", "source": {"path": str(qwen_path)}, "n_ctx": 2048, "parallel": 2, "tags": ["code", "general"]}
    # parallel 2: the native batched backend (one instance, paged KV), as the default registry's
    native = {"backend": "native", "source": {"path": str(qwen_path)}, "n_ctx": 2048, "kv_cache": "fp8", "idle_unload_s": 0,
              "parallel": 2}
    proc = ServerProcess(gemma_registry(gemma_path, **{QWEN: qwen, NATIVE: native}), tmp_path_factory.mktemp("tools"))
    yield proc.wait_healthy()
    proc.stop()


def client(server: ServerProcess, role: str = "standard") -> OpenAI:
    return OpenAI(base_url=server.url[role] + "/v1", api_key="unused", max_retries=0, timeout=300)


def ask(server: ServerProcess, **kwargs: Any) -> Any:
    body = {"model": QWEN, "messages": ASK_WEATHER, "tools": TOOLS, "temperature": 0, "max_tokens": 120, **kwargs}
    return client(server).chat.completions.create(**body)


def streamed(server: ServerProcess, **kwargs: Any) -> tuple[str, list[dict[str, Any]], str | None]:
    """(content, calls reassembled from the deltas, finish_reason) of a streamed answer, with the
    OpenAI streaming order checked: a call's id and name come first, then its arguments."""
    content, calls, finish = "", {}, None
    for chunk in ask(server, stream=True, **kwargs):
        choice = chunk.choices[0]
        delta = choice.delta
        content += delta.content or ""
        for tc in delta.tool_calls or ():
            if tc.index not in calls:
                assert tc.id and tc.id.startswith("call_") and tc.function.name and tc.type == "function", tc
                calls[tc.index] = {"id": tc.id, "name": tc.function.name, "arguments": tc.function.arguments or ""}
            else:
                assert tc.id is None and not tc.function.name, "id and name come once, first"
                calls[tc.index]["arguments"] += tc.function.arguments or ""
        finish = choice.finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish


def valid(name: str, arguments: str) -> dict[str, Any]:
    args = json.loads(arguments)
    jsonschema.validate(args, SCHEMAS[name])
    return args  # type: ignore[no-any-return]


PROMPTS = {
    "get_weather": "What is the weather in Paris right now, in celsius?",
    "add": "What is 2.5 plus 4?",
    "place_order": "Order a keyboard and a mouse for Ana, who is a VIP customer.",
}


@pytest.mark.parametrize("name", sorted(PROMPTS))
def test_named_function_call_validates_streamed_and_not(srv: ServerProcess, name: str) -> None:
    messages = [{"role": "user", "content": PROMPTS[name]}]
    choice = {"type": "function", "function": {"name": name}}
    out = ask(srv, messages=messages, tool_choice=choice)
    msg = out.choices[0].message
    assert out.choices[0].finish_reason == "tool_calls" and msg.tool_calls and len(msg.tool_calls) == 1
    call = msg.tool_calls[0]
    assert call.function.name == name and call.id.startswith("call_")
    valid(name, call.function.arguments)
    content, calls, finish = streamed(srv, messages=messages, tool_choice=choice)
    assert finish == "tool_calls" and [(c["name"], c["arguments"]) for c in calls] == [(name, call.function.arguments)]
    assert not content


def test_required_calls_validate_for_every_prompt(srv: ServerProcess) -> None:
    for prompt in PROMPTS.values():
        out = ask(srv, messages=[{"role": "user", "content": prompt}], tool_choice="required")
        calls = out.choices[0].message.tool_calls
        assert calls, out
        for call in calls:
            valid(call.function.name, call.function.arguments)


def test_parallel_tool_calls_false_gives_one_call(srv: ServerProcess) -> None:
    messages = [{"role": "user", "content": "What is the weather in Paris and in Tokyo, in celsius?"}]
    for parallel in (False, True):
        out = ask(srv, messages=messages, tool_choice="required", parallel_tool_calls=parallel)
        calls = out.choices[0].message.tool_calls or []
        assert 1 <= len(calls) and (parallel or len(calls) == 1), (parallel, calls)


def test_auto_calls_a_relevant_tool_and_answers_otherwise(srv: ServerProcess) -> None:
    out = ask(srv, tool_choice="auto")
    calls = out.choices[0].message.tool_calls
    assert calls and calls[0].function.name == "get_weather", out
    assert valid("get_weather", calls[0].function.arguments)["city"] == "Paris"
    content, scalls, finish = streamed(srv, tool_choice="auto")
    assert finish == "tool_calls" and [c["arguments"] for c in scalls] == [c.function.arguments for c in calls]
    plain = ask(srv, messages=[{"role": "user", "content": "Write a Python function that reverses a string."}], tools=[WEATHER])
    # the model answers with a JSON object naming a tool that does not exist: text, not a call
    assert not plain.choices[0].message.tool_calls and plain.choices[0].message.content
    assert plain.choices[0].finish_reason in ("stop", "length")


def test_tool_choice_none_answers_in_text(srv: ServerProcess) -> None:
    out = ask(srv, tool_choice="none", max_tokens=30)
    assert not out.choices[0].message.tool_calls and out.choices[0].message.content
    assert "<tool_call>" not in out.choices[0].message.content


def test_full_loop_call_result_answer(srv: ServerProcess) -> None:
    """call -> tool result in the history -> an answer that uses it. The answering request
    sends no tools: with them (auto), this 0.5B model calls get_weather again instead."""
    asked = [{"role": "system", "content": "You are a helpful assistant. When a tool result is given, answer the user in "
                                           "one sentence using it."}, *ASK_WEATHER]
    first = ask(srv, messages=asked, tool_choice="required").choices[0].message
    assert first.tool_calls
    call = first.tool_calls[0]
    history = [*asked, first.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"sky": "sunny", "temperature_c": 31})}]
    final = client(srv).chat.completions.create(model=QWEN, messages=history, temperature=0, max_tokens=60).choices[0]
    assert not final.message.tool_calls and final.finish_reason == "stop"
    assert "31" in (final.message.content or ""), final.message.content


def test_generic_format_on_a_model_without_tool_markup(srv: ServerProcess) -> None:
    """Gemma's named `gemma` format renders no tools: its calls come as one JSON object under a
    grammar, and still parse and validate."""
    out = ask(srv, model=GEMMA, tool_choice={"type": "function", "function": {"name": "add"}},
              messages=[{"role": "user", "content": PROMPTS["add"]}])
    calls = out.choices[0].message.tool_calls
    assert calls and calls[0].function.name == "add"
    valid("add", calls[0].function.arguments)


def test_native_engine_generates_the_same_constrained_calls(srv: ServerProcess) -> None:
    """The native engine samples under the same grammar (llama.cpp's grammar engine on our
    logits): its calls validate, under a named function and under auto (streamed)."""
    for name in ("get_weather", "place_order"):
        messages = [{"role": "user", "content": PROMPTS[name]}]
        out = ask(srv, model=NATIVE, messages=messages, tool_choice={"type": "function", "function": {"name": name}})
        [call] = out.choices[0].message.tool_calls or []
        assert call.function.name == name
        valid(name, call.function.arguments)
    _, calls, finish = streamed(srv, model=NATIVE, tool_choice="auto")
    assert finish == "tool_calls" and calls[0]["name"] == "get_weather"
    valid("get_weather", calls[0]["arguments"])


# -- bad input: 400 naming the field --------------------------------------------------------------


def refused(server: ServerProcess, role: str = "standard", **kwargs: Any) -> dict[str, Any]:
    with pytest.raises(openai.BadRequestError) as info:
        client(server, role).chat.completions.create(**{"model": QWEN, "messages": ASK_WEATHER, "max_tokens": 4, **kwargs})
    body = info.value.body
    assert isinstance(body, dict) and body["type"] == "invalid_request_error" and body["message"], body
    return body


def test_unknown_function_in_tool_choice_is_400(srv: ServerProcess) -> None:
    body = refused(srv, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}})
    assert body["param"] == "tool_choice" and "nope" in body["message"]


def test_tool_choice_without_tools_is_400(srv: ServerProcess) -> None:
    assert refused(srv, tool_choice="required")["param"] == "tool_choice"


def test_uncompilable_schema_is_400_naming_it(srv: ServerProcess) -> None:
    bad = fn("f", "", {"x": {"type": "string", "pattern": "^[a-z]+$"}}, ["x"])
    assert refused(srv, tools=[bad])["param"].startswith("tools[0]")
    assert refused(srv, tools=[{"type": "function", "function": {"name": "has space"}}])["param"].startswith("tools[0]")


def test_tool_result_without_a_matching_call_is_400(srv: ServerProcess) -> None:
    history = [*ASK_WEATHER, {"role": "tool", "tool_call_id": "call_missing", "content": "18C"}]
    body = refused(srv, tools=TOOLS, messages=history)
    assert "tool_call_id" in body["param"] and "call_missing" in body["message"]


def test_consensus_port_refuses_tools(srv: ServerProcess) -> None:
    body = refused(srv, role="consensus", model="auto", tools=TOOLS)
    assert body["param"] == "tools"


def test_response_format_with_tools_is_400(srv: ServerProcess) -> None:
    body = refused(srv, tools=TOOLS, response_format={"type": "json_object"})
    assert body["param"] == "response_format"


# -- scripted backends: the two-phase `auto` run and thinking ---------------------------------------

HERMES_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                   "{% if tools %}<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools> use <tool_call>{% endif %}"
                   "<|im_start|>assistant\n")
CALL = '\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>'


class Scripted(FakeBackendBase):
    """Phase one (the chat prompt) writes text, the marker split over two tokens, then text that
    must be dropped; phase two (a text prompt ending in the marker) writes the call."""

    def __init__(self, script: list[str]) -> None:
        self.script = script
        self.seen: list[tuple[str, SamplingParams]] = []
        self.phase_one_cancelled = threading.Event()

    def generate(self, prepared: Prepared, params: SamplingParams, outcome: GenerationOutcome,
                 cancel: threading.Event) -> Iterator[TokenEvent]:
        self.seen.append((type(prepared.prompt).__name__, params))
        phase_two = isinstance(prepared.prompt, TextPrompt)
        assert not phase_two or (prepared.text or "").endswith("<tool_call>")
        pieces = [CALL[i:i + 7] for i in range(0, len(CALL), 7)] if phase_two else self.script
        outcome.prompt_tokens = prepared.n_tokens
        for piece in pieces:
            if cancel.is_set():
                self.phase_one_cancelled.set()
                return
            outcome.completion_tokens += 1
            yield TokenEvent(1, piece)
        outcome.finish_reason = "stop"


def scripted_app(tmp: Path, backend: Scripted, **entry: Any) -> Any:
    path = tmp / "hermes.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_string("tokenizer.chat_template", HERMES_TEMPLATE)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    registry = parse_registry({"models": {"m": {"source": {"path": str(path)}, "n_threads": 1, **entry}}}, tmp)
    pool = ModelPool(registry, loader=lambda mid, spec, n: backend)
    return create_app(AppState.create(registry, ServerSettings(), pool), "standard")


def post(app: Any, body: dict[str, Any]) -> httpx.Response:
    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return await c.post("/v1/chat/completions", json={"model": "m", "messages": ASK_WEATHER, **body}, timeout=30)

    return asyncio.run(go())


def sse_chunks(r: httpx.Response) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]


def test_auto_runs_free_text_then_a_constrained_call(tmp_path: Path) -> None:
    backend = Scripted(["I will check.", "<tool", "_call>", "\nDROPPED", " more"])
    app = scripted_app(tmp_path, backend)
    r = post(app, {"tools": [WEATHER], "max_tokens": 50})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["message"]["content"] == "I will check."
    [call] = choice["message"]["tool_calls"]
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}
    assert choice["finish_reason"] == "tool_calls"
    assert backend.phase_one_cancelled.is_set(), "phase one is stopped at the marker"
    (kind1, p1), (kind2, p2) = backend.seen
    assert (kind1, kind2) == ("ChatPrompt", "TextPrompt")
    assert p1.grammar is None and p2.grammar and "get_weather" in p2.grammar and p2.stop == ()
    assert p2.max_tokens == 50 - 3  # both phases share max_tokens (phase one spent 3 before the stop was seen)
    assert r.json()["usage"]["completion_tokens"] == 3 + len(range(0, len(CALL), 7))
    backend.seen.clear()
    chunks = sse_chunks(post(app, {"tools": [WEATHER], "max_tokens": 50, "stream": True}))
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert "".join(d.get("content") or "" for d in deltas) == "I will check."
    parts = [tc for d in deltas for tc in d.get("tool_calls") or ()]
    assert parts[0]["function"]["name"] == "get_weather" and parts[0]["id"].startswith("call_")
    assert "".join(p["function"].get("arguments", "") for p in parts) == call["function"]["arguments"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_thinking_goes_to_reasoning_content(tmp_path: Path) -> None:
    backend = Scripted(["<th", "ink>Paris is", " in France.</th", "ink>", "Sunny."])
    app = scripted_app(tmp_path, backend, reasoning="think")
    msg = post(app, {"max_tokens": 20}).json()["choices"][0]["message"]
    assert msg["reasoning_content"] == "Paris is in France." and msg["content"] == "Sunny."
    deltas = [c["choices"][0]["delta"] for c in sse_chunks(post(app, {"max_tokens": 20, "stream": True}))]
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == "Paris is in France."
    assert "".join(d.get("content") or "" for d in deltas) == "Sunny."


# -- the Responses API: function tools as items ------------------------------------------------------

FLAT_WEATHER = {"type": "function", "name": "get_weather", "description": WEATHER["function"]["description"],
                "parameters": SCHEMAS["get_weather"]}


def test_responses_function_call_items_and_their_output(srv: ServerProcess) -> None:
    c = client(srv)
    first = c.responses.create(model=QWEN, input=ASK_WEATHER[0]["content"], tools=[FLAT_WEATHER], tool_choice="required",
                               temperature=0, max_output_tokens=100)
    calls = [item for item in first.output if item.type == "function_call"]
    assert first.status == "completed" and len(calls) >= 1 and calls[0].name == "get_weather"
    valid("get_weather", calls[0].arguments)
    assert first.tools and first.tools[0].name == "get_weather"
    # the result goes back as a function_call_output item, continuing the stored conversation
    answer = c.responses.create(model=QWEN, previous_response_id=first.id, temperature=0, max_output_tokens=60,
                                input=[{"type": "function_call_output", "call_id": calls[0].call_id,
                                        "output": json.dumps({"sky": "sunny", "temperature_c": 31})}])
    assert answer.status == "completed" and answer.output_text and not [i for i in answer.output if i.type == "function_call"]


def test_responses_stream_sends_call_items(srv: ServerProcess) -> None:
    body = {"model": QWEN, "input": ASK_WEATHER[0]["content"], "tools": [FLAT_WEATHER], "temperature": 0,
            "tool_choice": {"type": "function", "name": "get_weather"}, "max_output_tokens": 100, "stream": True}
    r = httpx.post(srv.url["standard"] + "/v1/responses", json=body, timeout=120)
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
    kinds = [e["type"] for e in events]
    assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"], kinds
    assert events[2]["item"]["type"] == "function_call" and events[2]["item"]["name"] == "get_weather"
    fragments = "".join(e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta")
    done = next(e for e in events if e["type"] == "response.function_call_arguments.done")
    assert done["arguments"] == fragments and valid("get_weather", fragments)
    assert kinds[-1] == "response.completed" and events[-1]["response"]["output"][0]["arguments"] == fragments
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
