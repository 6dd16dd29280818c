"""Fan-out, quorum, cancellation and the thread split, in process, through the real pool,
Generation and consensus routes. The experts are scripted backends (via the pool's loader seam):
the seam lets a test make one expert slow and another fail on purpose."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Any, Iterator, Sequence

import httpx
import pytest

from capibara6.api.app import AppState, create_app
from capibara6.config import ServerSettings, parse_registry
from capibara6.errors import ExpertsFailed
from capibara6.orchestrator.fanout import ExpertAnswer, ExpertTask, fan_out
from capibara6.orchestrator.routing import resolve
from capibara6.orchestrator.service import ConsensusRun
from capibara6.pool import ModelPool
from capibara6.serving import Plan
from capibara6.types import GenerationOutcome, SamplingParams, TokenEvent
from tests.fakes import FakeBackendBase

# model id -> (answer, seconds per token, failure message)
SCRIPT: dict[str, tuple[str, float, str | None]] = {
    "quick": ("The answer is 12", 0.005, None),
    "steady": ("I think 12", 0.01, None),
    "other": ("It is 13", 0.01, None),
    "slow": ("The answer is 12", 2.0, None),
    "broken": ("", 0.0, "out of cheese"),
}


class Scripted(FakeBackendBase):
    """A Backend that answers a fixed text, a word per `delay` seconds, or fails."""

    n_ctx = 1024

    def __init__(self, model_id: str, n_threads: int) -> None:
        self.model_id = model_id
        self.answer, self.delay, self.fail = SCRIPT[model_id]
        self.threads = n_threads
        self.thread_log: list[int] = []

    def tokenize(self, text: str, *, add_bos: bool = True) -> list[int]:
        return [1] * max(1, len(text.split()))

    def chat_prompt(self, messages: Sequence[dict[str, object]]) -> tuple[str, tuple[str, ...]]:
        return " ".join(str(m.get("content")) for m in messages), ()

    def current_threads(self) -> int:
        return self.threads

    def set_threads(self, n: int) -> None:
        self.threads = n
        self.thread_log.append(n)

    def generate(self, prompt: Any, params: SamplingParams, outcome: GenerationOutcome, cancel: threading.Event) -> Iterator[TokenEvent]:
        outcome.prompt_tokens = prompt.n_tokens
        if self.fail:
            raise RuntimeError(self.fail)
        return self._run(outcome, cancel)

    def _run(self, outcome: GenerationOutcome, cancel: threading.Event) -> Iterator[TokenEvent]:
        self.thread_log.append(-self.threads)  # negative: the count a generation ran with
        words = self.answer.split(" ")
        for i, word in enumerate(words):
            if cancel.wait(self.delay):
                return
            outcome.completion_tokens += 1
            yield TokenEvent(1, word if i == 0 else " " + word)
        outcome.finish_reason = "stop"

    def memory_bytes(self) -> int:
        return 0

    def close(self) -> None:
        pass


def make_state(n_threads: int = 1, **ensembles: Any) -> AppState:
    models = {m: {"source": {"path": f"/nonexistent/{m}.gguf"}, "n_threads": n_threads, "tags": ["general"]} for m in SCRIPT}
    models["steady"]["priority"] = 2
    registry = parse_registry({"models": models, "ensembles": ensembles}, Path("."))
    pool = ModelPool(registry, loader=lambda mid, spec, n: Scripted(mid, n))
    return AppState.create(registry, ServerSettings(), pool)


def chat_plan(model: str = "x") -> Plan:
    msgs = [{"role": "user", "content": "What is 5 + 7?"}]
    return Plan(model, True, [msgs], 1, 16, SamplingParams(seed=1))


def run(state: AppState, experts: list[str], strategy: str = "vote", timeout_s: float = 0.5, min_responses: int = 1) -> ConsensusRun:
    from capibara6.orchestrator.routing import ConsensusOptions

    opts = ConsensusOptions(experts=experts, strategy=strategy, timeout_s=timeout_s, min_responses=min_responses)  # type: ignore[arg-type]
    cplan = resolve(state.registry, "quick", opts, "What is 5 + 7?")
    assert cplan is not None
    return ConsensusRun(state.service, cplan, chat_plan())


def leases(state: AppState) -> dict[str, int]:
    return {m: state.pool.describe(m)["leases"] for m in SCRIPT}


def test_slow_expert_times_out_and_broken_one_is_dropped() -> None:
    async def go() -> ConsensusRun:
        state = make_state()
        r = run(state, ["quick", "slow", "broken", "steady", "other"], timeout_s=0.6, min_responses=2)
        await r.prepare()
        text = "".join([p async for p in r.pieces()])
        await r.aclose()
        assert leases(state) == dict.fromkeys(SCRIPT, 0)
        return r, text  # type: ignore[return-value]

    r, text = asyncio.run(go())  # type: ignore[misc]
    status = {e["model"]: e["status"] for e in r.report()["experts"]}
    assert status == {"quick": "ok", "slow": "timeout", "broken": "error", "steady": "ok", "other": "ok"}
    report = r.report()
    broken = next(e for e in report["experts"] if e["model"] == "broken")
    assert "out of cheese" in broken["error"]
    assert report["votes"] == {"12": 2, "13": 1}
    assert report["chosen"] == {"expert": "steady", "index": 3}  # 12 wins; steady has the higher priority
    assert text == "I think 12" and report["agreement"] == pytest.approx(2 / 3, abs=1e-3)
    assert r.usage()["completion_tokens"] == 4 + 3 + 3


def test_quorum_not_met_raises_with_each_reason() -> None:
    async def go() -> None:
        state = make_state()
        r = run(state, ["quick", "slow", "broken"], timeout_s=0.4, min_responses=2)
        with pytest.raises(ExpertsFailed) as info:
            await r.prepare()
        await r.aclose()
        msg = info.value.message
        assert info.value.status == 502
        assert "1 of 3 experts answered, 2 needed" in msg
        assert "slow (#2): timeout after 0.4 s" in msg and "broken (#3): out of cheese" in msg
        assert leases(state) == dict.fromkeys(SCRIPT, 0)

    asyncio.run(go())


def test_fastest_cancels_the_others() -> None:
    async def go() -> ConsensusRun:
        state = make_state()
        r = run(state, ["slow", "quick"], strategy="fastest", timeout_s=30)
        t0 = asyncio.get_running_loop().time()
        await r.prepare()
        assert asyncio.get_running_loop().time() - t0 < 5  # not waiting for the 2 s/token expert
        assert leases(state) == dict.fromkeys(SCRIPT, 0)
        return r

    r = asyncio.run(go())
    rep = r.report()
    assert [e["status"] for e in rep["experts"]] == ["cancelled", "ok"]
    assert rep["chosen"]["expert"] == "quick"


def test_cancelling_the_fan_out_cancels_every_expert() -> None:
    finished: list[int] = []

    async def call(task: ExpertTask) -> ExpertAnswer:
        try:
            await asyncio.sleep(30)
        finally:
            finished.append(task.index)
        return ExpertAnswer("x")

    async def go() -> None:
        tasks = [ExpertTask(i, "m", i, None) for i in range(3)]
        fut = asyncio.ensure_future(fan_out(tasks, call, 60))
        await asyncio.sleep(0.05)
        fut.cancel()
        with pytest.raises(asyncio.CancelledError):
            await fut

    asyncio.run(go())
    assert sorted(finished) == [0, 1, 2]


def test_thread_split_is_applied_and_restored() -> None:
    async def go() -> AppState:
        state = make_state(n_threads=4)
        r = run(state, ["quick", "steady", "other"], timeout_s=5)
        assert [t.threads for t in r.tasks()] == [1, 1, 1] or all(t.threads and t.threads < 4 for t in r.tasks())
        await r.prepare()
        return state

    state = asyncio.run(go())
    for m in ("quick", "steady", "other"):
        backend = state.pool.loaded(m)
        split = backend.thread_log[0]  # type: ignore[union-attr]
        assert split < 4
        assert backend.thread_log == [split, -split, 4]  # type: ignore[union-attr]  # set, ran with it, restored


async def _post(state: AppState, body: dict[str, Any], path: str = "/v1/chat/completions") -> httpx.Response:
    app = create_app(state, "consensus")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        return await c.post(path, json=body, timeout=30)


def test_api_502_in_openai_shape_and_consensus_field() -> None:
    state = make_state(trio={"experts": ["quick", "steady", "other"], "strategy": "vote", "min_responses": 3, "timeout_s": 5})
    msgs = [{"role": "user", "content": "What is 5 + 7?"}]
    bad = asyncio.run(_post(state, {"model": "quick", "messages": msgs,
                                    "consensus": {"experts": ["broken", "slow"], "timeout_s": 0.3}}))
    assert bad.status_code == 502
    err = bad.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == "consensus_failed"
    assert "broken (#1): out of cheese" in err["message"] and "slow (#2): timeout" in err["message"]
    ok = asyncio.run(_post(state, {"model": "trio", "messages": msgs}))
    assert ok.status_code == 200, ok.text
    body = ok.json()
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["content"] == "I think 12"
    assert body["consensus"]["ensemble"] == "trio" and len(body["consensus"]["experts"]) == 3
    assert body["usage"]["completion_tokens"] == 10
    comp = asyncio.run(_post(state, {"model": "trio", "prompt": "5 + 7 =", "max_tokens": 8}, "/v1/completions"))
    assert comp.status_code == 200 and comp.json()["choices"][0]["text"] == "I think 12"
    n2 = asyncio.run(_post(state, {"model": "trio", "messages": msgs, "n": 2}))
    assert n2.status_code == 400 and n2.json()["error"]["param"] == "n"
    metrics = state.pool.metrics.render().decode()
    assert 'capibara6_consensus_expert_latency_seconds_count{expert="quick"}' in metrics
    assert "capibara6_consensus_agreement_ratio_count 2.0" in metrics  # the chat and the completion


def test_api_streams_chosen_answer_with_consensus_in_final_chunk() -> None:
    state = make_state(trio={"experts": ["quick", "steady", "other"], "strategy": "vote", "timeout_s": 5})
    body = {"model": "trio", "messages": [{"role": "user", "content": "5 + 7?"}], "stream": True,
            "stream_options": {"include_usage": True}}
    resp = asyncio.run(_post(state, body))
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
    events = [e for e in resp.text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "I think 12"
    final = chunks[-2]
    assert final["choices"][0]["finish_reason"] == "stop" and final["consensus"]["chosen"]["expert"] == "steady"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 10
    assert len({c["id"] for c in chunks}) == 1


def test_models_list_has_ensembles_and_auto_on_consensus_only() -> None:
    state = make_state(trio={"experts": ["quick", "steady"], "description": "two"})

    async def get(role: str, path: str) -> httpx.Response:
        app = create_app(state, role)  # type: ignore[arg-type]
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return await c.get(path)

    ids = [m["id"] for m in asyncio.run(get("consensus", "/v1/models")).json()["data"]]
    assert ids[-2:] == ["trio", "auto"] and "quick" in ids
    card = asyncio.run(get("consensus", "/v1/models/trio")).json()
    assert card["object"] == "model" and card["ensemble"]["experts"] == ["quick", "steady"]
    assert "trio" not in [m["id"] for m in asyncio.run(get("standard", "/v1/models")).json()["data"]]
    assert asyncio.run(get("standard", "/v1/models/trio")).status_code == 404
