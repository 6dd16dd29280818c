"""The OpenAI API over real HTTP with the real `openai` client and the real model."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from tests.serverproc import ServerProcess

MODEL = "gemma3-270m"
CHAT = [{"role": "user", "content": "Write one sentence about the sea."}]
PROMPT = "The three primary colours are"


def client(server: ServerProcess, role: str = "standard") -> OpenAI:
    return OpenAI(base_url=server.url[role] + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_list_and_get_models(server: ServerProcess) -> None:
    models = client(server).models.list()
    ids = [m.id for m in models.data]
    assert ids == ["gemma3-270m", "broken"]
    card = client(server).models.retrieve(MODEL)
    assert card.id == MODEL and card.object == "model"
    assert card.model_extra and card.model_extra["status"] in ("unloaded", "loading", "ready", "busy")


def test_chat_and_completion_non_streaming(server: ServerProcess) -> None:
    c = client(server)
    chat = c.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, temperature=0)
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content
    assert chat.choices[0].finish_reason in ("stop", "length")
    comp = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0)
    assert comp.object == "text_completion" and comp.choices[0].text
    assert comp.usage is not None and comp.usage.completion_tokens <= 8


@pytest.mark.parametrize("role", ["standard", "streaming"])
def test_stream_equals_non_stream_greedy(server: ServerProcess, role: str) -> None:
    c = client(server, role)
    whole = c.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=24, temperature=0, stream=False)
    chunks = list(c.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=24, temperature=0, stream=True))
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert streamed == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    text = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0, stream=False)
    parts = list(c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in parts if p.choices) == text.choices[0].text


def test_max_tokens_gives_length_and_real_usage(server: ServerProcess, gemma_path: Any) -> None:
    from llama_cpp import Llama

    vocab = Llama(model_path=str(gemma_path), vocab_only=True, verbose=False)
    out = client(server).completions.create(model=MODEL, prompt=PROMPT, max_tokens=7, temperature=0, logprobs=0)
    assert out.choices[0].finish_reason == "length"
    assert out.usage is not None
    assert out.usage.prompt_tokens == len(vocab.tokenize(PROMPT.encode(), add_bos=True, special=True))
    assert out.usage.completion_tokens == 7
    assert out.choices[0].logprobs is not None and len(out.choices[0].logprobs.tokens or []) == 7
    assert "".join(out.choices[0].logprobs.tokens or []) == out.choices[0].text


def test_stop_sequence(server: ServerProcess) -> None:
    c = client(server)
    free = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=20, temperature=0).choices[0].text
    words = free.split()
    assert len(words) >= 3, free
    stop = " " + words[2]  # a word that greedy decoding is known to produce
    out = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=20, temperature=0, stop=[stop, "\n\n\n"])
    assert out.choices[0].finish_reason == "stop"
    assert stop not in out.choices[0].text
    assert free.startswith(out.choices[0].text)
    parts = list(c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=20, temperature=0, stop=stop, stream=True))
    assert "".join(p.choices[0].text for p in parts if p.choices) == out.choices[0].text


def test_n_choices(server: ServerProcess) -> None:
    out = client(server).chat.completions.create(model=MODEL, messages=CHAT, max_tokens=6, temperature=0.9, n=2, seed=3)
    assert [ch.index for ch in out.choices] == [0, 1]
    assert all(ch.message.content for ch in out.choices)
    assert out.usage is not None and out.usage.completion_tokens == sum(
        6 if ch.finish_reason == "length" else 0 for ch in out.choices
    ) or out.usage.completion_tokens > 0


def test_seed_is_reproducible(server: ServerProcess) -> None:
    c = client(server)
    a = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0.9, seed=42).choices[0].text
    b = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0.9, seed=42).choices[0].text
    assert a == b


def test_include_usage_in_last_chunk(server: ServerProcess) -> None:
    chunks = list(
        client(server, "streaming").chat.completions.create(
            model=MODEL, messages=CHAT, max_tokens=5, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 5
    assert all(ch.usage is None for ch in chunks[:-1])


def test_chat_logprobs(server: ServerProcess) -> None:
    out = client(server).chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3
    )
    content = out.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == 5
    for item in content:
        assert item.logprob <= 0 and len(item.top_logprobs) == 3
        assert item.top_logprobs[0].logprob == pytest.approx(item.logprob, abs=1e-4)  # greedy: the top token
        assert [t.logprob for t in item.top_logprobs] == sorted((t.logprob for t in item.top_logprobs), reverse=True)


def test_json_schema_response_format(server: ServerProcess) -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "boolean"}}, "required": ["answer"]}
    out = client(server).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Is water wet? Answer in JSON."}], max_tokens=40,
        temperature=0, response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},
    )
    assert isinstance(json.loads(out.choices[0].message.content or "")["answer"], bool)


def test_raw_sse_framing(server: ServerProcess) -> None:
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 4, "temperature": 0, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", server.url["streaming"] + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    payloads = [json.loads(e[len("data: "):]) for e in events[:-2]]
    assert all(e.startswith("data: ") and "\n" not in e for e in events[:-1])
    assert payloads[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [p["choices"][0]["finish_reason"] for p in payloads[1:-2]] == [None] * (len(payloads) - 3)
    assert payloads[-2]["choices"][0]["finish_reason"] == "length"
    assert payloads[-1]["choices"] == [] and payloads[-1]["usage"]["completion_tokens"] == 4
    assert len({p["id"] for p in payloads}) == 1


def _error(resp: httpx.Response, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err  # type: ignore[no-any-return]


def test_errors_in_openai_shape(server: ServerProcess) -> None:
    url = server.url["standard"]
    err = _error(httpx.post(url + "/v1/chat/completions", json={"model": MODEL, "messages": CHAT, "temperature": 5}), 400)
    assert err["param"] == "temperature"
    _error(httpx.post(url + "/v1/chat/completions", json={"model": MODEL}), 400)
    _error(httpx.post(url + "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}), 400)
    err = _error(httpx.post(url + "/v1/chat/completions", json={"model": "nope", "messages": CHAT}), 404)
    assert err["code"] == "model_not_found"
    _error(httpx.get(url + "/v1/models/nope"), 404)
    err = _error(httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 100000}), 400)
    assert err["param"] == "max_tokens"
    long_prompt = "word " * 900  # ~900 tokens + 200 > n_ctx 1024
    err = _error(httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": long_prompt, "max_tokens": 200}, timeout=60), 400)
    assert err["code"] == "context_length_exceeded"
    err = _error(httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "x" * 70000}), 413)
    with pytest.raises(openai.NotFoundError):
        client(server).chat.completions.create(model="nope", messages=CHAT)  # type: ignore[arg-type]


def test_unloadable_model_503_others_keep_serving(server: ServerProcess) -> None:
    url = server.url["standard"]
    err = _error(httpx.post(url + "/v1/completions", json={"model": "broken", "prompt": "hi", "max_tokens": 2}, timeout=60), 503)
    assert err["code"] == "model_unavailable"
    ok = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200
    again = httpx.post(url + "/v1/completions", json={"model": "broken", "prompt": "hi", "max_tokens": 2}, timeout=60)
    assert again.status_code == 503  # retried, failed again, still reported cleanly


def test_disconnect_mid_stream_frees_the_model(server: ServerProcess) -> None:
    url = server.url["streaming"]
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 1000, "temperature": 0.8, "stop": []}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: ") for line in got)
        # /health answers while the generation runs: never queued behind inference
        assert httpx.get(url + "/health", timeout=5).status_code == 200
    # the abandoned 1000-token generation would take ~20 s; the next request must not wait for it
    t0 = time.monotonic()
    nxt = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 3, "stream": False}, timeout=60)
    assert nxt.status_code == 200
    assert time.monotonic() - t0 < 8


def test_disconnect_non_streaming_frees_the_model(server: ServerProcess) -> None:
    url = server.url["standard"]
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 1000, "temperature": 0.8}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/completions", json=body, timeout=httpx.Timeout(60, read=1.5))
    t0 = time.monotonic()
    nxt = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 3}, timeout=60)
    assert nxt.status_code == 200
    assert time.monotonic() - t0 < 8


def test_concurrent_requests_all_answered(server: ServerProcess) -> None:
    results: list[int] = []

    def one(i: int) -> None:
        r = httpx.post(server.url["standard"] + "/v1/completions", json={"model": MODEL, "prompt": f"{i} +", "max_tokens": 3}, timeout=120)
        results.append(r.status_code)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200] * 4


def test_completion_prompt_list_echo_and_streamed_n(server: ServerProcess) -> None:
    c = client(server)
    out = c.completions.create(model=MODEL, prompt=["One two", "Red green"], max_tokens=3, temperature=0, echo=True)
    assert [ch.index for ch in out.choices] == [0, 1]
    assert out.choices[0].text.startswith("One two") and out.choices[1].text.startswith("Red green")
    chunks = list(c.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=3, temperature=0, n=2, stream=True))
    finished = {ch.choices[0].index: ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason}
    assert finished == {0: "length", 1: "length"}
    texts = ["".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices and ch.choices[0].index == i) for i in (0, 1)]
    assert texts[0] == texts[1] and texts[0]  # greedy: both choices agree


def test_stream_default_per_role(server: ServerProcess) -> None:
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 2}
    std = httpx.post(server.url["standard"] + "/v1/completions", json=body, timeout=60)
    assert std.headers["content-type"].startswith("application/json")
    streaming = httpx.post(server.url["streaming"] + "/v1/completions", json=body, timeout=60)
    assert streaming.headers["content-type"].startswith("text/event-stream")
    assert streaming.text.endswith("data: [DONE]\n\n")
    explicit = httpx.post(server.url["streaming"] + "/v1/completions", json={**body, "stream": False}, timeout=60)
    assert explicit.json()["object"] == "text_completion"


def test_unsupported_content_part_is_400(server: ServerProcess) -> None:
    msg = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]
    r = httpx.post(server.url["standard"] + "/v1/chat/completions", json={"model": MODEL, "messages": msg}, timeout=30)
    assert _error(r, 400)["param"] == "messages"
