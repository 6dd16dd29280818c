"""The consensus port (8084) with the real model through the real `openai` client.

Three registry ids (two aliases) share the embedded Gemma 3 270M GGUF, so the three experts are
separate loaded instances that really run in parallel (1 thread each; the box is shared).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
from openai import OpenAI

from tests.conftest import gemma_registry
from tests.serverproc import ServerProcess

Q = [{"role": "user", "content": "What is 12 + 7? Answer with a number."}]


@pytest.fixture(scope="module")
def cserver(gemma_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("consensus")
    bad = tmp / "corrupt.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    alias = {"source": {"path": str(gemma_path)}, "chat_format": "gemma", "tags": ["general"]}
    registry = gemma_registry(
        gemma_path, **{"gemma-b": {**alias, "priority": 1}, "gemma-c": alias, "broken": {"source": {"path": str(bad)}, "chat_format": "gemma"}}
    )
    registry["pool"]["max_loaded"] = 5
    registry["ensembles"] = {
        "trio": {"experts": ["gemma3-270m", "gemma-b", "gemma-c"], "strategy": "vote", "timeout_s": 90, "min_responses": 2},
    }
    proc = ServerProcess(registry, tmp).wait_healthy()
    yield proc
    proc.stop()


def client(server: ServerProcess, role: str = "consensus") -> OpenAI:
    return OpenAI(base_url=server.url[role] + "/v1", api_key="unused", max_retries=0, timeout=180)


def consensus_of(obj: Any) -> dict[str, Any]:
    extra = obj.model_extra or {}
    assert "consensus" in extra, obj
    return extra["consensus"]  # type: ignore[no-any-return]


@pytest.mark.parametrize("strategy", ["vote", "fastest", "synthesize"])
def test_strategies_non_streaming(cserver: ServerProcess, strategy: str) -> None:
    out = client(cserver).chat.completions.create(
        model="trio", messages=Q, max_tokens=8, temperature=0.7, seed=5, extra_body={"consensus": {"strategy": strategy}}
    )
    c = consensus_of(out)
    assert c["strategy"] == strategy and c["ensemble"] == "trio"
    assert [e["model"] for e in c["experts"]] == ["gemma3-270m", "gemma-b", "gemma-c"]
    content = out.choices[0].message.content
    assert content
    ok = [e for e in c["experts"] if e["status"] == "ok"]
    assert out.usage is not None
    if strategy == "fastest":
        assert len(ok) >= 1 and content == next(e["answer"] for e in c["experts"] if e["model"] == c["chosen"]["expert"])
    else:
        assert len(ok) == 3 and all(e["completion_tokens"] > 0 and e["latency_s"] > 0 for e in ok)
        assert 0 < c["agreement"] <= 1
    if strategy == "vote":
        assert content == c["experts"][c["chosen"]["index"]]["answer"]
        assert out.usage.completion_tokens == sum(e["completion_tokens"] for e in c["experts"])
    if strategy == "synthesize":
        agg = c["aggregator"]
        assert c["chosen"] == {"aggregator": agg["model"]} and agg["completion_tokens"] > 0
        assert out.usage.completion_tokens == sum(e["completion_tokens"] for e in c["experts"]) + agg["completion_tokens"]


@pytest.mark.parametrize("strategy", ["vote", "fastest", "synthesize"])
def test_strategies_streaming(cserver: ServerProcess, strategy: str) -> None:
    chunks = list(client(cserver).chat.completions.create(
        model="trio", messages=Q, max_tokens=8, temperature=0.7, seed=9, stream=True,
        stream_options={"include_usage": True}, extra_body={"consensus": {"strategy": strategy}},
    ))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    final = [ch for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert len(final) == 1
    c = consensus_of(final[0])
    assert c["strategy"] == strategy and text
    if strategy == "synthesize":
        assert len([ch for ch in chunks if ch.choices and ch.choices[0].delta.content]) >= 2  # the aggregator's tokens, live
    else:
        chosen = c["experts"][c["chosen"]["index"]]
        assert text == chosen["answer"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_self_consistency_greedy_agrees(cserver: ServerProcess) -> None:
    out = client(cserver).chat.completions.create(model="trio", messages=Q, max_tokens=8, temperature=0)
    c = consensus_of(out)
    answers = {e["answer"] for e in c["experts"]}
    assert len(answers) == 1 and c["agreement"] == 1.0  # same weights, greedy: identical answers
    assert out.choices[0].message.content in answers


def test_judge_and_completions_endpoint(cserver: ServerProcess) -> None:
    out = client(cserver).completions.create(
        model="trio", prompt="12 + 7 =", max_tokens=6, temperature=0.8, seed=3, extra_body={"consensus": {"strategy": "judge"}}
    )
    c = consensus_of(out)
    assert c["strategy"] == "judge" and out.choices[0].text
    judge = c["judge"]
    assert judge["model"] == "gemma-b"  # the highest-priority expert judges by default
    assert sorted(judge["order"]) == [0, 1, 2]
    assert "fallback" in judge or judge["verdict"].strip() in ("1", "2", "3")  # a grammar-bound verdict


def test_plain_model_id_behaves_like_8082(cserver: ServerProcess) -> None:
    a = client(cserver).chat.completions.create(model="gemma3-270m", messages=Q, max_tokens=8, temperature=0)
    b = client(cserver, "standard").chat.completions.create(model="gemma3-270m", messages=Q, max_tokens=8, temperature=0)
    assert "consensus" not in (a.model_extra or {})
    assert a.choices[0].message.content == b.choices[0].message.content


def test_quorum_failure_is_502_with_reasons(cserver: ServerProcess) -> None:
    body = {"model": "gemma3-270m", "messages": Q, "max_tokens": 4,
            "consensus": {"experts": ["gemma3-270m", "broken"], "min_responses": 2}}
    r = httpx.post(cserver.url["consensus"] + "/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 502, r.text
    err = r.json()["error"]
    assert err["code"] == "consensus_failed" and "broken (#2)" in err["message"] and "could not be loaded" in err["message"]
    unknown = httpx.post(cserver.url["consensus"] + "/v1/chat/completions", timeout=30,
                         json={**body, "consensus": {"experts": ["/etc/passwd"]}})
    assert unknown.status_code == 400 and unknown.json()["error"]["code"] == "model_not_found"


def test_disconnect_during_fan_out_releases_every_lease(cserver: ServerProcess) -> None:
    url = cserver.url["consensus"] + "/v1/chat/completions"
    long = {"model": "trio", "messages": [{"role": "user", "content": "Tell a long story."}], "max_tokens": 1000,
            "temperature": 0.8, "consensus": {"strategy": "vote"}}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url, json=long, timeout=httpx.Timeout(60, read=2.0))
    # three abandoned 1000-token generations would take a minute; the next request must not wait
    t0 = time.monotonic()
    nxt = httpx.post(url, json={"model": "trio", "messages": Q, "max_tokens": 3}, timeout=60)
    assert nxt.status_code == 200, nxt.text
    assert time.monotonic() - t0 < 15
    admin = httpx.get(cserver.url["standard"] + "/admin/models", timeout=10)
    if admin.status_code == 200:  # the pool's admin view, when present: nothing left leased
        rows = admin.json()
        rows = rows.get("data", rows) if isinstance(rows, dict) else rows
        assert all(m.get("leases", 0) == 0 for m in rows if isinstance(m, dict))


def test_models_and_metrics(cserver: ServerProcess) -> None:
    ids = [m.id for m in client(cserver).models.list().data]
    assert "trio" in ids and "auto" in ids
    assert "trio" not in [m.id for m in client(cserver, "standard").models.list().data]
    text = httpx.get(cserver.url["consensus"] + "/metrics", timeout=10).text
    assert 'capibara6_consensus_expert_latency_seconds_count{expert="gemma-b"}' in text
    assert "capibara6_consensus_agreement_ratio_bucket" in text


# -- routing by prompt length to state-space experts (issue 21) ----------------------------------


@pytest.fixture(scope="module")
def lserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Tiny random-weight models only (no Gemma): a transformer, a Mamba-2 and a Falcon-H1 hybrid,
    the two recurrent ones preferring prompts of 256 tokens or more."""
    from tests.backends.ssm_models import write_tiny_falcon_h1, write_tiny_mamba2, write_tiny_transformer

    tmp = tmp_path_factory.mktemp("long-context")
    files = {"tiny-llama": write_tiny_transformer(tmp / "llama.gguf"), "tiny-mamba2": write_tiny_mamba2(tmp / "mamba2.gguf"),
             "tiny-falcon-h1": write_tiny_falcon_h1(tmp / "falcon-h1.gguf")}
    models: dict[str, Any] = {m: {"source": {"path": str(p)}, "chat_format": "chatml", "tags": ["general"]} for m, p in files.items()}
    models["tiny-mamba2"]["prefers"] = {"min_prompt_tokens": 256}
    models["tiny-falcon-h1"]["prefers"] = {"min_prompt_tokens": 256}
    registry = {"defaults": {"n_ctx": 4096, "n_threads": 1}, "pool": {"max_loaded": 3}, "models": models,
                "ensembles": {"mixed": {"experts": ["tiny-llama", "tiny-mamba2"], "strategy": "vote"}}}
    proc = ServerProcess(registry, tmp).wait_healthy()
    yield proc
    proc.stop()


LONG = [{"role": "user", "content": "the cat sat on the mat and the dog ran home. " * 30}]  # 1350 bytes: 338 estimated tokens


def test_auto_routes_long_prompts_to_the_ssm_experts(lserver: ServerProcess) -> None:
    c = client(lserver)
    short = consensus_of(c.chat.completions.create(model="auto", messages=[{"role": "user", "content": "the cat"}], max_tokens=4, temperature=0))
    assert [e["model"] for e in short["experts"]] == ["tiny-llama"]
    assert short["route"]["long_context"] is False and short["route"]["prompt_tokens"] == 2
    out = c.chat.completions.create(model="auto", messages=LONG, max_tokens=4, temperature=0)
    long = consensus_of(out)
    assert sorted(e["model"] for e in long["experts"]) == ["tiny-falcon-h1", "tiny-mamba2"]
    assert all(e["status"] == "ok" and e["prompt_tokens"] > 1000 for e in long["experts"])  # byte tokens: the real count
    route = long["route"]
    assert route["long_context"] is True and route["prompt_tokens"] == 338 and route["min_prompt_tokens"] == 256
    assert route["tokens_estimated"] is True and "338 prompt tokens >= min_prompt_tokens 256" in route["reason"]
    assert out.choices[0].message.content == next(e["answer"] for e in long["experts"] if e["model"] == long["chosen"]["expert"])


def test_an_ensemble_mixes_a_transformer_and_an_ssm_expert(lserver: ServerProcess) -> None:
    out = client(lserver).chat.completions.create(model="mixed", messages=LONG, max_tokens=4, temperature=0)
    c = consensus_of(out)
    assert [e["model"] for e in c["experts"]] == ["tiny-llama", "tiny-mamba2"] and "route" not in c
    assert all(e["status"] == "ok" and e["completion_tokens"] >= 1 for e in c["experts"])
    auto = next(m for m in httpx.get(lserver.url["consensus"] + "/v1/models", timeout=30).json()["data"] if m["id"] == "auto")
    assert auto["ensemble"]["min_prompt_tokens"] == {"tiny-mamba2": 256, "tiny-falcon-h1": 256}
