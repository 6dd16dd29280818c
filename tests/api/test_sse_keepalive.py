"""SSE keep-alive: headers at once, `: ping` comments while a stream waits, the exact OpenAI lines
afterwards, disconnects seen while pinging, and which errors keep their status code.

A real server (`--sse-ping-s 0.3`) serves the embedded model with parallel 1, so a second stream
queues behind a long generation; the consensus cases use scripted experts in process.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import httpx
import openai
import pytest
from openai import OpenAI

from capibara6.api.app import AppState, create_app
from capibara6.config import ServerSettings, parse_registry
from capibara6.pool import ModelPool
from capibara6.types import GenerationOutcome, SamplingParams, TokenEvent
from tests.conftest import gemma_registry
from tests.fakes import FakeBackendBase
from tests.serverproc import ServerProcess

MODEL = "gemma3-270m"
PING_S = 0.3
LONG = {"prompt": "1, 2, 3, 4, 5, 6, 7, 8,", "max_tokens": 1000, "temperature": 0, "stop": [], "stream": True}
SHORT = {"model": MODEL, "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 6, "temperature": 0}


@pytest.fixture(scope="module")
def srv(gemma_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    q0 = {"source": {"path": str(gemma_path)}, "chat_format": "gemma", "max_queue": 0}
    proc = ServerProcess(gemma_registry(gemma_path, q0=q0), tmp_path_factory.mktemp("sse"), args=["--sse-ping-s", str(PING_S)])
    yield proc.wait_healthy()
    proc.stop()


class Holder:
    """A stream that keeps a model's one slot busy (greedy counting runs on) until closed."""

    def __init__(self, url: str, model: str = MODEL) -> None:
        self._client = httpx.Client(timeout=60)
        self._cm = self._client.stream("POST", url + "/v1/completions", json={"model": model, **LONG})
        r = self._cm.__enter__()
        assert r.status_code == 200
        self._lines = r.iter_lines()
        while not next(self._lines).startswith("data: "):  # pings while the model loads
            pass  # bounded by the client's read timeout

    def close(self) -> None:
        if not self._client.is_closed:
            self._cm.__exit__(None, None, None)
            self._client.close()


def describe(url: str, model: str = MODEL) -> dict[str, Any]:
    data = httpx.get(url + "/admin/models", timeout=5).json()["data"]
    return next(m for m in data if m["id"] == model)  # type: ignore[no-any-return]


def wait_for(cond: Any, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def events_of(lines: Sequence[str]) -> list[list[str]]:
    """Blank-line separated events; asserts the stream ended with a blank line."""
    assert lines and lines[-1] == "", lines[-5:]
    out: list[list[str]] = [[]]
    for line in lines[:-1]:
        if line == "":
            out.append([])
        else:
            out[-1].append(line)
    return out


def assert_openai_framing(events: list[list[str]]) -> list[dict[str, Any]]:
    """Each event is one line: a `: ping` comment or `data: ...`; the data lines are OpenAI's chat
    stream exactly: role chunk first, content chunks, a finish chunk, then `data: [DONE]`."""
    assert all(len(e) == 1 for e in events), events
    data = [e[0] for e in events if e[0] != ": ping"]
    assert all(line.startswith("data: ") for line in data), data
    assert data[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: "):]) for line in data[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert len({c["id"] for c in chunks}) == 1
    return chunks


def test_queued_stream_pings_then_streams_the_exact_lines(srv: ServerProcess) -> None:
    url = srv.url["streaming"]
    holder = Holder(url)
    try:
        t0 = time.monotonic()
        with httpx.stream("POST", url + "/v1/chat/completions", json=SHORT, timeout=60) as r:
            # the headers came although the request is queued behind the holder
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            assert describe(url)["waiting"] == 1
            lines = r.iter_lines()
            head = [next(lines) for _ in range(6)]  # three pings: 3 x the interval, still queued
            held_s = time.monotonic() - t0
            assert head == [": ping", ""] * 3
            assert held_s >= 2.5 * PING_S  # pings after silence, not a burst
            assert describe(url)["waiting"] == 1
            holder.close()  # the slot frees: the queued request runs
            rest = list(lines)
    finally:
        holder.close()
    events = events_of(head + rest)
    chunks = assert_openai_framing(events)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    first_data = next(i for i, e in enumerate(events) if e[0] != ": ping")
    assert first_data >= 3


class Tee(httpx.HTTPTransport):
    """A transport that keeps a copy of every response byte (what the SDK was given to parse)."""

    def __init__(self) -> None:
        super().__init__()
        self.raw = bytearray()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        resp = super().handle_request(request)
        raw = self.raw

        class Copy(httpx.SyncByteStream):
            def __iter__(self) -> Iterator[bytes]:
                for chunk in resp.stream:  # type: ignore[union-attr]
                    raw.extend(chunk)
                    yield chunk

            def close(self) -> None:
                resp.close()

        return httpx.Response(resp.status_code, headers=resp.headers, stream=Copy(), extensions=resp.extensions)


def test_openai_client_reads_a_pinged_stream_unchanged(srv: ServerProcess) -> None:
    url = srv.url["streaming"]
    expected = OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120).chat.completions.create(
        **SHORT, stream=False  # type: ignore[call-overload]
    ).choices[0].message.content
    tee = Tee()
    client = OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120, http_client=httpx.Client(transport=tee))
    holder = Holder(url)
    out: dict[str, Any] = {}

    def read() -> None:
        try:
            out["chunks"] = list(client.chat.completions.create(**SHORT, stream=True, stream_options={"include_usage": True}))  # type: ignore[call-overload]
        except Exception as err:  # reported by the assertions below
            out["error"] = err

    t = threading.Thread(target=read)
    try:
        t.start()
        wait_for(lambda: describe(url)["waiting"] == 1, "the SDK's request never queued")
        wait_for(lambda: tee.raw.count(b": ping\n\n") >= 3, "no pings while queued", timeout=30)
    finally:
        holder.close()
        t.join(120)
    assert "error" not in out, out
    chunks = out["chunks"]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert tee.raw.startswith(b": ping\n\n") and tee.raw.endswith(b"data: [DONE]\n\n")


def test_disconnect_during_pings_frees_the_queue_place_at_once(srv: ServerProcess) -> None:
    url = srv.url["streaming"]
    holder = Holder(url)
    try:
        with httpx.stream("POST", url + "/v1/chat/completions", json=SHORT, timeout=60) as r:
            lines = r.iter_lines()
            assert next(lines) == ": ping"
            assert describe(url)["waiting"] == 1
        t0 = time.monotonic()  # the client is gone; the holder's generation has ~15 s to run
        wait_for(lambda: describe(url)["waiting"] == 0, "the disconnected stream kept its queue place", timeout=5)
        assert time.monotonic() - t0 < 5
        assert describe(url)["leases"] == 1  # the holder still generates
        metrics = httpx.get(url + "/metrics", timeout=5).text
        assert "capibara6_num_requests_waiting 0.0" in metrics
    finally:
        holder.close()
    wait_for(lambda: describe(url)["leases"] == 0, "the holder's lease never returned")
    r = httpx.post(url + "/v1/chat/completions", json={**SHORT, "stream": False}, timeout=60)
    assert r.status_code == 200


def _error(resp: httpx.Response, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    return resp.json()["error"]  # type: ignore[no-any-return]


def test_errors_known_before_the_headers_keep_their_status(srv: ServerProcess) -> None:
    url = srv.url["streaming"]  # stream defaults to true here
    assert _error(httpx.post(url + "/v1/chat/completions", json={**SHORT, "temperature": 5}), 400)["param"] == "temperature"
    assert _error(httpx.post(url + "/v1/chat/completions", json={**SHORT, "model": "nope"}), 404)["code"] == "model_not_found"
    long_prompt = {"model": MODEL, "prompt": "word " * 900, "max_tokens": 200}  # > n_ctx 1024
    assert _error(httpx.post(url + "/v1/completions", json=long_prompt, timeout=60), 400)["code"] == "context_length_exceeded"
    holder = Holder(url, "q0")
    try:  # max_queue 0: refused at enqueue, before any header
        r = httpx.post(url + "/v1/completions", json={"model": "q0", "prompt": "Hi", "max_tokens": 2}, timeout=30)
        assert _error(r, 429)["code"] == "queue_full" and r.headers["retry-after"].isdigit()
    finally:
        holder.close()


def test_error_after_the_headers_ends_the_stream_as_an_error_event(srv: ServerProcess) -> None:
    url = srv.url["streaming"]
    long_prompt = {"model": MODEL, "prompt": "word " * 900, "max_tokens": 200}
    holder = Holder(url)
    try:  # queued: the headers went out before the prompt could be checked
        with httpx.stream("POST", url + "/v1/completions", json=long_prompt, timeout=60) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            assert next(lines) == ": ping"
            holder.close()
            rest = list(lines)
    finally:
        holder.close()
    events = [e for e in events_of([": ping", *rest]) if e != [": ping"]]
    assert len(events) == 1 and len(events[0]) == 1, events
    err = json.loads(events[0][0].removeprefix("data: "))["error"]
    assert err["code"] == "context_length_exceeded" and set(err) == {"message", "type", "param", "code"}
    holder = Holder(url)

    def release_once_queued() -> None:
        wait_for(lambda: describe(url)["waiting"] == 1, "the SDK's request never queued")
        holder.close()

    releaser = threading.Thread(target=release_once_queued)
    releaser.start()
    try:  # the SDK raises the error event (a 200 stream, so not a BadRequestError)
        client = OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
        with pytest.raises(openai.APIError, match="maximum context length") as raised:
            list(client.completions.create(model=MODEL, prompt="word " * 900, max_tokens=200, stream=True))
        assert not isinstance(raised.value, openai.APIStatusError)
    finally:
        releaser.join(30)
        holder.close()


# -- consensus: scripted experts, in process --------------------------------------------------

SCRIPT = {"slow-a": (0.4, None), "slow-b": (0.4, None), "broken": (0.0, "out of cheese")}  # s per word, failure


class Expert(FakeBackendBase):
    """A Backend that answers "twelve it is" a word per `delay` seconds, or fails."""

    n_ctx = 1024

    def __init__(self, model_id: str) -> None:
        self.model_id = model_id
        self.delay, self.fail = SCRIPT[model_id]

    def tokenize(self, text: str, *, add_bos: bool = True) -> list[int]:
        return [1] * max(1, len(text.split()))

    def chat_prompt(self, messages: Sequence[dict[str, object]]) -> tuple[str, tuple[str, ...]]:
        return " ".join(str(m.get("content")) for m in messages), ()

    def generate(self, prompt: Any, params: SamplingParams, outcome: GenerationOutcome, cancel: threading.Event) -> Iterator[TokenEvent]:
        outcome.prompt_tokens = prompt.n_tokens
        if self.fail:
            raise RuntimeError(self.fail)
        return self._run(outcome, cancel)

    def _run(self, outcome: GenerationOutcome, cancel: threading.Event) -> Iterator[TokenEvent]:
        for i, word in enumerate(["twelve", "it", "is"]):
            if cancel.wait(self.delay):
                return
            outcome.completion_tokens += 1
            yield TokenEvent(1, word if i == 0 else " " + word)
        outcome.finish_reason = "stop"

    def memory_bytes(self) -> int:
        return 0

    def close(self) -> None:
        pass


def consensus_state() -> AppState:
    models = {m: {"source": {"path": f"/nonexistent/{m}.gguf"}, "n_threads": 1, "tags": ["general"]} for m in SCRIPT}
    ensembles = {
        "pair": {"experts": ["slow-a", "slow-b"], "strategy": "vote", "timeout_s": 10},
        "doomed": {"experts": ["broken", "broken"], "strategy": "vote", "timeout_s": 10, "min_responses": 1},
    }
    registry = parse_registry({"models": models, "ensembles": ensembles}, Path("."))
    pool = ModelPool(registry, loader=lambda mid, spec, n: Expert(mid))
    return AppState.create(registry, ServerSettings.model_validate({"sse_ping_s": 0.1}), pool)


def post_consensus(body: dict[str, Any]) -> httpx.Response:
    async def go() -> httpx.Response:
        app = create_app(consensus_state(), "consensus")
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return await c.post("/v1/chat/completions", json={**body, "stream": True}, timeout=30)

    return asyncio.run(go())


def test_consensus_stream_pings_while_the_experts_run() -> None:
    r = post_consensus({"model": "pair", "messages": [{"role": "user", "content": "5 + 7?"}]})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = events_of(r.text.splitlines())
    pings = next(i for i, e in enumerate(events) if e != [": ping"])
    assert pings >= 5  # ~1.2 s of experts at one ping per 0.1 s of silence
    chunks = assert_openai_framing(events)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "twelve it is"
    assert chunks[-1]["consensus"]["chosen"] is not None


def test_consensus_stream_tells_a_failed_quorum_in_the_stream() -> None:
    r = post_consensus({"model": "doomed", "messages": [{"role": "user", "content": "5 + 7?"}]})
    assert r.status_code == 200  # the headers went out before the experts ran
    events = [e for e in events_of(r.text.splitlines()) if e != [": ping"]]
    assert len(events) == 1, events
    err = json.loads(events[0][0].removeprefix("data: "))["error"]
    assert err["code"] == "consensus_failed" and "out of cheese" in err["message"]
