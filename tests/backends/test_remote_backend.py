"""Remote experts: a second capibara6 on another loopback port serves as an expert (backend
`remote`), reached over real HTTP; chat goes to its chat endpoint as messages."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest
from openai import OpenAI

from capibara6.backends.remote import base_url, estimate_tokens
from capibara6.types import ChatPrompt, TextPrompt, TokenPrompt
from tests.conftest import gemma_registry
from tests.serverproc import ServerProcess, free_port

Q = [{"role": "user", "content": "Name a colour of the sky."}]


@pytest.fixture(scope="module")
def pair(gemma_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    """(the remote VM stand-in, the front server whose registry points at it)."""
    far = ServerProcess(gemma_registry(gemma_path), tmp_path_factory.mktemp("far"), args=["--api-key", "s3cret"]).wait_healthy()
    remote = {"backend": "remote", "source": {"url": far.url["standard"] + "/v1"}, "remote_model": "gemma3-270m",
              "api_key_env": "FAR_KEY", "tags": ["general"]}
    dead = {"backend": "remote", "source": {"url": f"http://127.0.0.1:{free_port()}"}}
    registry = gemma_registry(gemma_path, **{"far-gemma": remote, "dead": dead})
    registry["ensembles"] = {"mixed": {"experts": ["gemma3-270m", "far-gemma"], "strategy": "vote", "min_responses": 2}}
    front = ServerProcess(registry, tmp_path_factory.mktemp("front"), env={"FAR_KEY": "s3cret"}).wait_healthy()
    yield far, front
    front.stop()
    far.stop()


def client(url: str, key: str = "unused") -> OpenAI:
    return OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=120)


def test_remote_model_answers_like_the_remote_server(pair: tuple[ServerProcess, ServerProcess]) -> None:
    far, front = pair
    direct = client(far.url["standard"], "s3cret").chat.completions.create(model="gemma3-270m", messages=Q, max_tokens=8, temperature=0)
    via = client(front.url["standard"]).chat.completions.create(model="far-gemma", messages=Q, max_tokens=8, temperature=0)
    assert via.choices[0].message.content == direct.choices[0].message.content  # the remote applied its own template
    assert via.usage is not None and direct.usage is not None
    assert via.usage.completion_tokens == direct.usage.completion_tokens and via.usage.prompt_tokens == direct.usage.prompt_tokens
    parts = list(client(front.url["streaming"]).completions.create(model="far-gemma", prompt="The sky is", max_tokens=6, temperature=0, stream=True))
    plain = client(far.url["standard"], "s3cret").completions.create(model="gemma3-270m", prompt="The sky is", max_tokens=6, temperature=0)
    assert "".join(p.choices[0].text for p in parts if p.choices) == plain.choices[0].text


def test_remote_expert_in_a_consensus(pair: tuple[ServerProcess, ServerProcess]) -> None:
    _, front = pair
    out = client(front.url["consensus"]).chat.completions.create(model="mixed", messages=Q, max_tokens=8, temperature=0)
    c = (out.model_extra or {})["consensus"]
    assert [(e["model"], e["status"]) for e in c["experts"]] == [("gemma3-270m", "ok"), ("far-gemma", "ok")]
    assert c["experts"][1]["threads"] is None  # remote: no local CPU share
    assert c["experts"][0]["answer"] == c["experts"][1]["answer"] and c["agreement"] == 1.0  # same model, greedy


def test_dead_remote_is_reported(pair: tuple[ServerProcess, ServerProcess]) -> None:
    _, front = pair
    r = httpx.post(front.url["standard"] + "/v1/chat/completions", json={"model": "dead", "messages": Q, "max_tokens": 4}, timeout=60)
    assert r.status_code == 503 and "not answering" in r.json()["error"]["message"]
    body = {"model": "gemma3-270m", "messages": Q, "max_tokens": 4, "consensus": {"experts": ["gemma3-270m", "dead"]}}
    ok = httpx.post(front.url["consensus"] + "/v1/chat/completions", json=body, timeout=60).json()
    assert [e["status"] for e in ok["consensus"]["experts"]] == ["ok", "error"]


def test_disconnect_cancels_the_remote_generation(pair: tuple[ServerProcess, ServerProcess]) -> None:
    far, front = pair
    body = {"model": "far-gemma", "prompt": "Once upon a time", "max_tokens": 900, "temperature": 0.8, "stream": True}
    with httpx.stream("POST", front.url["standard"] + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        assert any(next(lines).startswith("data: ") for _ in range(4))
    t0 = time.monotonic()  # both the front's lease and the far server's model must be free again
    nxt = httpx.post(front.url["standard"] + "/v1/completions", json={"model": "far-gemma", "prompt": "Hi", "max_tokens": 3}, timeout=60)
    assert nxt.status_code == 200 and time.monotonic() - t0 < 10


def test_remote_prompt_helpers() -> None:
    assert base_url("http://h:1/v1/") == "http://h:1" and base_url("http://h:1") == "http://h:1"
    assert estimate_tokens(TextPrompt("x" * 40)) == 10 and estimate_tokens(TokenPrompt((1, 2, 3))) == 3
    assert estimate_tokens(ChatPrompt(({"role": "user", "content": "x" * 40},))) == 14  # 4 tokens of role markup


def test_remote_refuses_what_it_cannot_pass_on(pair: tuple[ServerProcess, ServerProcess]) -> None:
    """grammar, logprobs and llama.cpp's extensions are 400s naming the field, never dropped."""
    _, front = pair
    url = front.url["standard"] + "/v1/chat/completions"
    for extra, field in (({"top_k": 5}, "top_k"), ({"logprobs": True}, "logprobs"),
                         ({"response_format": {"type": "json_object"}}, "response_format")):
        r = httpx.post(url, json={"model": "far-gemma", "messages": Q, "max_tokens": 4, **extra}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
        assert "far-gemma" in r.json()["error"]["message"]
