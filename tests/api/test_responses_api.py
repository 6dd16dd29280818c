"""POST /v1/responses (and GET / DELETE /v1/responses/{id}) through the real `openai` client on a
real server with the real model; the store's bounds with an injected clock."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import openai
import pydantic
import pytest
from openai import OpenAI

from capibara6.api.response_store import ResponseStore
from tests.conftest import gemma_registry
from tests.serverproc import ServerProcess

MODEL = "gemma3-270m"
ASK = "Write one sentence about the sea."


@pytest.fixture(scope="module")
def rserver(gemma_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("responses")
    bad = tmp / "corrupt.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    registry = gemma_registry(gemma_path, broken={"source": {"path": str(bad)}, "chat_format": "gemma"})
    registry["ensembles"] = {"pair": {"experts": [MODEL, MODEL], "strategy": "vote"}}
    proc = ServerProcess(registry, tmp).wait_healthy()
    yield proc
    proc.stop()


def client(server: ServerProcess, role: str = "standard") -> OpenAI:
    return OpenAI(base_url=server.url[role] + "/v1", api_key="unused", max_retries=0, timeout=120)


# -- the store, with an injected clock ----------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _resp(rid: str, text: str = "x") -> dict[str, Any]:
    return {"id": rid, "output_text": text}


def test_store_ttl_lru_and_caps() -> None:
    clock = Clock()
    store = ResponseStore(max_entries=2, max_bytes=10_000, ttl_s=10, clock=clock)
    store.put(_resp("a"), [])
    store.put(_resp("b"), [])
    assert store.get("a") is not None  # a is now the most recent
    store.put(_resp("c"), [])
    assert store.get("b") is None and store.get("a") is not None and store.get("c") is not None  # LRU went
    clock.t = 10.0
    assert store.get("a") is None and len(store) == 0 and store.bytes == 0  # expired
    small = ResponseStore(max_entries=100, max_bytes=200, ttl_s=10, clock=clock)
    assert not small.put(_resp("big", "y" * 500), [])  # alone over the byte cap: not kept
    for i in range(10):
        small.put(_resp(f"r{i}"), [{"role": "user", "content": "hi"}])
    assert 0 < small.bytes <= 200 and small.get("r9") is not None and small.get("r0") is None
    assert small.delete("r9") and not small.delete("r9") and small.get("r9") is None


# -- the API over HTTP --------------------------------------------------------------------------


def test_text_response_shape_and_usage(rserver: ServerProcess) -> None:
    r = client(rserver).responses.create(model=MODEL, input=ASK, instructions="Answer briefly.", max_output_tokens=12, temperature=0)
    assert r.id.startswith("resp_") and r.object == "response" and r.model == MODEL
    assert r.status in ("completed", "incomplete")
    assert len(r.output) == 1 and r.output[0].type == "message" and r.output[0].role == "assistant"
    assert r.output[0].content[0].type == "output_text" and r.output_text
    assert r.output_text == r.output[0].content[0].text
    u = r.usage
    assert u is not None and u.input_tokens > 0 and 0 < u.output_tokens <= 12
    assert u.total_tokens == u.input_tokens + u.output_tokens
    assert u.input_tokens_details.cached_tokens >= 0 and u.output_tokens_details.reasoning_tokens == 0
    assert r.instructions == "Answer briefly." and r.max_output_tokens == 12 and r.temperature == 0
    # the same prompt through chat completions: the same greedy text and prompt tokens
    chat = client(rserver).chat.completions.create(
        model=MODEL, messages=[{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": ASK}],
        max_tokens=12, temperature=0)
    assert chat.choices[0].message.content == r.output_text
    assert chat.usage is not None and chat.usage.prompt_tokens == u.input_tokens


def test_responses_are_counted_in_requests_total(rserver: ServerProcess) -> None:
    def count(status: str) -> float:
        text = httpx.get(rserver.url["standard"] + "/metrics", timeout=30).text
        prefix = 'capibara6_requests_total{endpoint="responses",model="%s",role="standard",status="%s"} ' % (MODEL, status)
        return sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if ln.startswith(prefix))

    before = count("200")
    client(rserver).responses.create(model=MODEL, input=ASK, max_output_tokens=2, temperature=0)
    assert count("200") == before + 1


def test_max_output_tokens_gives_incomplete(rserver: ServerProcess) -> None:
    r = client(rserver).responses.create(model=MODEL, input="Count from one to one hundred in words.", max_output_tokens=3, temperature=0)
    assert r.status == "incomplete" and r.incomplete_details is not None
    assert r.incomplete_details.reason == "max_output_tokens"
    assert r.usage is not None and r.usage.output_tokens == 3 and r.output[0].status == "incomplete"


def test_input_items_as_messages(rserver: ServerProcess) -> None:
    items: Any = [
        {"role": "developer", "content": "Answer briefly."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Name a colour."}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Blue."}]},
        {"role": "user", "content": "Another one."},
    ]
    r = client(rserver).responses.create(model=MODEL, input=items, max_output_tokens=8, temperature=0)
    assert r.output_text and r.usage is not None and r.usage.input_tokens > 10


class YesNo(pydantic.BaseModel):
    answer: bool


def test_json_schema_output(rserver: ServerProcess) -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "boolean"}}, "required": ["answer"], "additionalProperties": False}
    r = client(rserver).responses.create(
        model=MODEL, input="Is water wet? Answer in JSON.", max_output_tokens=40, temperature=0,
        text={"format": {"type": "json_schema", "name": "yesno", "schema": schema, "strict": True}},
    )
    assert r.status == "completed"
    assert isinstance(json.loads(r.output_text)["answer"], bool)
    assert r.text is not None and r.text.format is not None and r.text.format.type == "json_schema"
    parsed = client(rserver).responses.parse(model=MODEL, input="Is water wet? Answer in JSON.", max_output_tokens=40,
                                             temperature=0, text_format=YesNo)  # the SDK's helper: a strict schema
    assert parsed.output_parsed is not None and isinstance(parsed.output_parsed.answer, bool)
    obj = client(rserver).responses.create(model=MODEL, input="A JSON object about a cat:", max_output_tokens=60,
                                           temperature=0, text={"format": {"type": "json_object"}})
    if obj.status == "completed":
        assert isinstance(json.loads(obj.output_text), dict)


def test_two_turns_through_previous_response_id(rserver: ServerProcess) -> None:
    c = client(rserver)
    first = c.responses.create(model=MODEL, input="My name is Ada. Say hello.", max_output_tokens=10, temperature=0)
    second = c.responses.create(model=MODEL, input="What is my name?", previous_response_id=first.id,
                                max_output_tokens=10, temperature=0)
    alone = c.responses.create(model=MODEL, input="What is my name?", max_output_tokens=10, temperature=0, store=False)
    assert second.previous_response_id == first.id and second.output_text
    assert first.usage is not None and second.usage is not None and alone.usage is not None
    # the second prompt holds the first turn (its input and output) before the new input
    assert second.usage.input_tokens >= first.usage.input_tokens + first.usage.output_tokens + alone.usage.input_tokens - 4
    # the same as sending the conversation by hand
    by_hand = c.responses.create(model=MODEL, temperature=0, max_output_tokens=10, store=False, input=[
        {"role": "user", "content": "My name is Ada. Say hello."},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "What is my name?"},
    ])
    assert by_hand.output_text == second.output_text and by_hand.usage is not None
    assert by_hand.usage.input_tokens == second.usage.input_tokens
    # store=False: nothing to continue from or fetch
    with pytest.raises(openai.NotFoundError):
        c.responses.create(model=MODEL, input="And then?", previous_response_id=alone.id, max_output_tokens=4)
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(alone.id)


def test_stored_response_fetched_and_deleted(rserver: ServerProcess) -> None:
    c = client(rserver)
    r = c.responses.create(model=MODEL, input=ASK, max_output_tokens=6, temperature=0, metadata={"k": "v"})
    got = c.responses.retrieve(r.id)
    assert got.id == r.id and got.output_text == r.output_text and got.metadata == {"k": "v"}
    assert got.usage is not None and r.usage is not None and got.usage.output_tokens == r.usage.output_tokens
    raw = httpx.delete(rserver.url["streaming"] + f"/v1/responses/{r.id}", timeout=10)  # every port shares the store
    assert raw.status_code == 200 and raw.json() == {"id": r.id, "object": "response.deleted", "deleted": True}
    for call in (lambda: c.responses.retrieve(r.id), lambda: c.responses.delete(r.id)):
        with pytest.raises(openai.NotFoundError) as exc:
            call()
        assert exc.value.status_code == 404
        body: Any = exc.value.body
        assert body["type"] == "invalid_request_error" and r.id in body["message"]
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve("resp_never")


def _events(raw: str) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for block in raw.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.split("\n") if not line.startswith(":"))
        if lines:
            out.append((lines["event"], json.loads(lines["data"])))
    return out


ORDER = ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"]
TAIL = ["response.output_text.done", "response.content_part.done", "response.output_item.done", "response.completed"]


def test_stream_event_order_and_sdk_stream(rserver: ServerProcess) -> None:
    body = {"model": MODEL, "input": ASK, "max_output_tokens": 60, "temperature": 0, "stream": True,
            "text": {"format": {"type": "json_object"}}}  # the grammar ends it with a stop, not the limit
    with httpx.stream("POST", rserver.url["standard"] + "/v1/responses", json=body, timeout=120) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        raw = resp.read().decode()
    assert "[DONE]" not in raw
    events = _events(raw)
    kinds = [k for k, _ in events]
    assert all(data["type"] == kind for kind, data in events)
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
    n = kinds.count("response.output_text.delta")
    assert n > 0 and kinds == ORDER + ["response.output_text.delta"] * n + TAIL
    deltas = "".join(d["delta"] for k, d in events if k == "response.output_text.delta")
    final = events[-1][1]["response"]
    assert events[0][1]["response"]["id"] == final["id"] and final["status"] == "completed"
    assert final["output"][0]["content"][0]["text"] == deltas == events[-4][1]["text"]
    assert final["usage"]["output_tokens"] >= n

    c = client(rserver)
    with c.responses.stream(model=MODEL, input=ASK, max_output_tokens=16, temperature=0) as stream:
        seen = list(stream)
        got = "".join(e.delta for e in seen if e.type == "response.output_text.delta")
        if seen[-1].type == "response.completed":
            assert stream.get_final_response().output_text == got
    assert seen[0].type == "response.created" and seen[-1].type in ("response.completed", "response.incomplete")
    whole = c.responses.create(model=MODEL, input=ASK, max_output_tokens=16, temperature=0)
    assert got == whole.output_text  # greedy: streamed == not streamed
    # a stream that stops on its own: the SDK's final response is the concatenated deltas
    with c.responses.stream(model=MODEL, input=ASK, max_output_tokens=60, temperature=0,
                            text={"format": {"type": "json_object"}}) as stream:
        got = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final_resp = stream.get_final_response()
    assert final_resp.status == "completed" and final_resp.output_text == got and got
    assert c.responses.retrieve(final_resp.id).output_text == got  # a stream is stored too


def test_streaming_port_streams_by_default(rserver: ServerProcess) -> None:
    body = {"model": MODEL, "input": ASK, "max_output_tokens": 3, "temperature": 0}
    with httpx.stream("POST", rserver.url["streaming"] + "/v1/responses", json=body, timeout=120) as resp:
        events = _events(resp.read().decode())
    assert events[0][0] == "response.created" and events[-1][0] == "response.incomplete"
    assert events[-1][1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}


def _error(resp: httpx.Response, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    err: dict[str, Any] = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


@pytest.mark.parametrize(("extra", "param", "words"), [
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/a.png"}]}]}, "input", "input_image"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}, "input", "input_file"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": "1"}, {"role": "user", "content": "x"}]}, "input", "'c'"),
    ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input", "call_id"),
    ({"input": [{"type": "custom_tool_call", "call_id": "c", "name": "f", "input": "x"}]}, "input", "custom_tool_call"),
    ({"input": [{"type": "web_search_call", "id": "w"}]}, "input", "web_search_call"),
    ({"input": [{"role": "tool", "content": "x"}]}, "input", "role"),
    ({"input": []}, "input", "no user"),
    ({"input": [{"role": "user", "content": [{"type": "input_text"}]}]}, "input", "string 'text'"),
    ({"tools": [{"type": "web_search"}]}, "tools", "'web_search' is not supported"),
    ({"tools": [{"type": "function", "name": "f"}], "tool_choice": {"type": "function", "name": "g"}}, "tool_choice", "g"),
    ({"reasoning": {"effort": "high"}}, "reasoning", "reasoning"),
    ({"include": ["message.output_text.logprobs"]}, "include", "include"),
    ({"background": True}, "background", "background"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text", "schema"),
    ({"text": {"verbosity": "high"}}, "text", "verbosity"),
    ({"temprature": 0}, "temprature", "Unrecognized"),
    ({"temperature": 5}, "temperature", "temperature"),
    ({"max_output_tokens": 100000}, "max_output_tokens", "limit"),
    ({"stream_options": {"include_obfuscation": False}}, "stream_options", "stream"),
])
def test_bad_input_in_openai_shape(rserver: ServerProcess, extra: dict[str, Any], param: str, words: str) -> None:
    body = {"model": MODEL, "input": ASK, **extra}
    err = _error(httpx.post(rserver.url["standard"] + "/v1/responses", json=body, timeout=30), 400)
    assert err["type"] == "invalid_request_error" and err["param"] == param and words in err["message"], err


def test_no_op_fields_accepted_and_model_errors(rserver: ServerProcess) -> None:
    url = rserver.url["standard"] + "/v1/responses"
    ok = {"model": MODEL, "input": ASK, "max_output_tokens": 2, "tools": [], "tool_choice": "auto", "include": [],
          "parallel_tool_calls": True, "truncation": "disabled", "user": "u", "service_tier": "auto", "background": False}
    assert httpx.post(url, json=ok, timeout=60).status_code == 200
    err = _error(httpx.post(url, json={"model": "nope", "input": ASK}, timeout=30), 404)
    assert err["code"] == "model_not_found"
    err = _error(httpx.post(url, json={"model": MODEL, "input": ASK, "previous_response_id": "resp_gone"}, timeout=30), 404)
    assert err["param"] == "previous_response_id"
    with pytest.raises(openai.BadRequestError) as exc:
        client(rserver).responses.create(model=MODEL, input=[{"role": "user", "content": [{"type": "input_audio"}]}])  # type: ignore[list-item]
    assert "input_audio" in exc.value.message


def test_error_after_the_headers_is_an_error_event(rserver: ServerProcess) -> None:
    """A model that fails to load once the stream is open: one `event: error`, then the end."""
    body = {"model": "broken", "input": ASK, "stream": True}
    with httpx.stream("POST", rserver.url["standard"] + "/v1/responses", json=body, timeout=60) as resp:
        assert resp.status_code == 200
        events = _events(resp.read().decode())
    assert [k for k, _ in events] == ["error"]
    data = events[0][1]
    assert data["type"] == "error" and data["code"] == "model_unavailable" and data["sequence_number"] == 0
    assert data["error"]["code"] == "model_unavailable"
    with pytest.raises(openai.APIError) as exc:
        with client(rserver).responses.stream(model="broken", input=ASK) as stream:
            list(stream)
    assert exc.value.body is not None and exc.value.body["code"] == "model_unavailable"  # type: ignore[index]


def test_consensus_port_serves_models_not_ensembles(rserver: ServerProcess) -> None:
    c = client(rserver, "consensus")
    assert c.responses.create(model=MODEL, input=ASK, max_output_tokens=2).output_text is not None
    with pytest.raises(openai.BadRequestError) as exc:
        c.responses.create(model="pair", input=ASK, max_output_tokens=2)
    assert exc.value.param == "model" and "ensemble" in exc.value.message


def test_expired_id_is_404(gemma_path: Path, tmp_path: Path) -> None:
    proc = ServerProcess(gemma_registry(gemma_path), tmp_path, args=["--responses-store-ttl-s", "1"]).wait_healthy()
    try:
        c = client(proc)
        r = c.responses.create(model=MODEL, input=ASK, max_output_tokens=2, temperature=0)
        assert c.responses.retrieve(r.id).id == r.id
        time.sleep(1.2)
        with pytest.raises(openai.NotFoundError):
            c.responses.retrieve(r.id)
        with pytest.raises(openai.NotFoundError):
            c.responses.create(model=MODEL, input="more", previous_response_id=r.id, max_output_tokens=2)
    finally:
        proc.stop()
