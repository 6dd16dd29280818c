"""The serving benchmark against a scripted SSE server on loopback (known delays, cut streams,
HTTP errors), its statistics, the compare table and plot, and its safety bounds."""

from __future__ import annotations

import asyncio
import io
import json
import math
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest
import uvicorn

from capibara6.bench.cli import UnsafeTarget, check_url, main
from capibara6.bench.client import RequestResult
from capibara6.bench.compare import goal_check, plot_comparison, print_comparison, ratios
from capibara6.bench.prompts import make_completion_prompts, make_prompts
from capibara6.bench.report import build_result, summarize_level
from capibara6.bench.runner import BenchConfig, LevelRun, run_bench
from capibara6.bench.stats import percentile, stdev, summarize
from tests.serverproc import free_port

SEED = 100
TOL = 0.25  # seconds a loaded shared box may add to a scripted sleep (never subtracted)

Send = Callable[[dict[str, Any]], Any]


def _chunk(text: str, finish: str | None = None) -> bytes:
    obj = {"object": "text_completion", "choices": [{"index": 0, "text": text, "finish_reason": finish}]}
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


class ScriptedServer:
    """An OpenAI-ish ASGI app whose stream for request i (from its `seed`) follows `scripts[i]`:
    ("ok", ttft, n_tokens, gap, usage_tokens) | ("cut", ttft, n_tokens, gap) | ("done_no_finish", ttft)
    | ("http", status) | ("hang",)."""

    def __init__(self, scripts: dict[int, tuple[Any, ...]]) -> None:
        self.scripts = scripts
        self.in_flight = 0
        self.max_in_flight = 0
        self.closing = False

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Any], send: Send) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] == "/v1/models":
            await self._json(send, 200, {"object": "list", "data": [{"id": "scripted", "object": "model"}]})
            return
        raw = b""
        while True:
            msg = await receive()
            raw += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        body = json.loads(raw)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await self._stream(send, self.scripts[body["seed"] - SEED], bool(body.get("stream_options")))
        finally:
            self.in_flight -= 1

    async def _json(self, send: Send, status: int, obj: dict[str, Any]) -> None:
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": json.dumps(obj).encode()})

    async def _stream(self, send: Send, script: tuple[Any, ...], usage: bool) -> None:
        kind = script[0]
        if kind == "http":
            err = {"error": {"message": "model busy", "type": "server_error", "param": None, "code": "busy"}}
            await self._json(send, script[1], err)
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})

        async def emit(data: bytes) -> None:
            await send({"type": "http.response.body", "body": data, "more_body": True})

        if kind == "hang":
            for _ in range(300):  # up to 30 s unless the test is over
                if self.closing:
                    break
                await asyncio.sleep(0.1)
        elif kind == "done_no_finish":  # what llama-cpp-python's server does when it interrupts
            await asyncio.sleep(script[1])
            await emit(_chunk("tok"))
            await emit(b"data: [DONE]\n\n")
        else:
            _, ttft, n, gap, *rest = script
            await asyncio.sleep(ttft)
            for k in range(n):
                if k:
                    await asyncio.sleep(gap)
                await emit(_chunk(f" t{k}"))
            if kind == "ok":
                await emit(_chunk("", "length"))
                if usage:
                    u = {"prompt_tokens": 3, "completion_tokens": rest[0], "total_tokens": 3 + rest[0]}
                    await emit(b"data: " + json.dumps({"choices": [], "usage": u}).encode() + b"\n\n")
                await emit(b"data: [DONE]\n\n")
        await send({"type": "http.response.body", "body": b"", "more_body": False})


@pytest.fixture
def scripted() -> Iterator[Callable[[dict[int, tuple[Any, ...]]], tuple[str, ScriptedServer]]]:
    started: list[tuple[uvicorn.Server, threading.Thread, ScriptedServer]] = []

    def start(scripts: dict[int, tuple[Any, ...]]) -> tuple[str, ScriptedServer]:
        app = ScriptedServer(scripts)
        port = free_port()
        srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error", lifespan="off"))
        th = threading.Thread(target=srv.run, daemon=True)
        th.start()
        deadline = time.monotonic() + 10
        while not srv.started and time.monotonic() < deadline:
            time.sleep(0.02)
        started.append((srv, th, app))
        return f"http://127.0.0.1:{port}", app

    yield start
    for srv, th, app in started:
        app.closing = True
        srv.should_exit = True
        th.join(10)


def _cfg(url: str, **kw: Any) -> BenchConfig:
    base = {"concurrency": [1], "max_tokens": 16, "seed": SEED, "warmup": 0, "timeout_s": 30.0, "max_seconds": 60.0}
    return BenchConfig(base_url=url, **{**base, **kw})


# --- statistics -----------------------------------------------------------------------------------

def test_percentiles_match_numpy_and_std_is_sample() -> None:
    xs = [0.3, 0.1, 0.25, 0.9, 0.05, 0.5, 0.11]
    for q in (0, 50, 95, 99, 100):
        assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))
    assert stdev(xs) == pytest.approx(float(np.std(xs, ddof=1)))
    s = summarize([])
    assert s["n"] == 0 and s["p50"] is None and s["std"] is None  # JSON-safe: no NaN
    assert summarize([2.0])["std"] == 0.0


def test_level_summary_from_known_results() -> None:
    def res(i: int, status: str, ttft: float | None, itl: list[float], usage: int | None, total: float) -> RequestResult:
        r = RequestResult(index=i, status=status, ttft=ttft, itl=itl, events=len(itl) + (ttft is not None),
                          usage_tokens=usage, total=total)
        r.finish_reason, r.done = ("length", True) if status == "ok" else (None, False)
        return r

    results = [
        res(0, "ok", 0.1, [0.02, 0.02, 0.02], 4, 1.0),
        res(1, "ok", 0.3, [0.04, 0.04, 0.04], None, 2.0),  # no usage chunk: 4 events counted
        res(2, "cut", 0.2, [0.06], None, 0.5),
        res(3, "http_error", None, [], None, 0.01),
    ]
    s = summarize_level(LevelRun(concurrency=2, planned=5, wall_s=2.0, results=results))
    assert s["completed"] == 2 and s["errors"] == 3
    assert s["error_kinds"] == {"cut": 1, "http_error": 1, "not_started": 1}
    assert s["output_tokens"] == 8 and s["aggregate_tok_s"] == pytest.approx(4.0)
    assert s["ttft_s"]["n"] == 3 and s["ttft_s"]["p50"] == pytest.approx(0.2)  # the cut stream's TTFT counts
    assert s["ttft_completed_s"]["n"] == 2 and s["ttft_completed_s"]["max"] == pytest.approx(0.3)
    assert s["itl_s"]["n"] == 7 and s["itl_s"]["p50"] == pytest.approx(0.04)
    assert s["e2e_s"]["n"] == 2 and s["e2e_s"]["std"] == pytest.approx(math.sqrt(0.5))
    assert s["request_tok_s"]["p50"] == pytest.approx((4 / 1.0 + 4 / 2.0) / 2)
    assert s["tokens_from_usage"] is False


def test_prompt_set_is_fixed_by_seed() -> None:
    assert make_prompts(6, 1) == make_prompts(6, 1)
    assert make_prompts(6, 1) != make_prompts(6, 2)
    assert make_completion_prompts(4, 0)[:2] == make_completion_prompts(2, 0)
    assert len(set(make_prompts(20, 0))) > 10


# --- against the scripted server -------------------------------------------------------------------

def test_known_delays_give_known_statistics(scripted: Any) -> None:
    url, _ = scripted({
        0: ("ok", 0.10, 5, 0.04, 5),
        1: ("ok", 0.20, 5, 0.04, 7),  # the usage chunk, not the event count, gives the tokens
        2: ("ok", 0.30, 5, 0.04, 5),
        3: ("cut", 0.05, 2, 0.04),  # stream closes: no finish_reason, no [DONE]
        4: ("done_no_finish", 0.05),  # [DONE] without a finish_reason
        5: ("http", 503),
    })
    model, levels = asyncio.run(run_bench(_cfg(url, requests=6)))
    assert model == "scripted"
    reqs = {r.index: r for r in levels[0].results}
    assert [reqs[i].status for i in range(6)] == ["ok", "ok", "ok", "cut", "cut", "http_error"]
    assert reqs[5].http_status == 503 and reqs[5].error == "model busy"
    assert reqs[3].error == "stream ended without [DONE]"
    assert reqs[4].error == "stream ended without finish_reason"
    for i, ttft in ((0, 0.10), (1, 0.20), (2, 0.30), (3, 0.05)):
        assert ttft <= reqs[i].ttft <= ttft + TOL  # type: ignore[operator]
    assert reqs[1].events == 5 and reqs[1].tokens == 7

    s = summarize_level(levels[0])
    assert s["completed"] == 3 and s["errors"] == 3 and s["error_kinds"] == {"cut": 2, "http_error": 1}
    assert s["output_tokens"] == 17 and s["tokens_from_usage"] is True
    assert s["aggregate_tok_s"] == pytest.approx(17 / levels[0].wall_s)
    assert levels[0].wall_s >= 0.26 + 0.36 + 0.46 + 0.09 + 0.05
    assert s["ttft_s"]["n"] == 5 and 0.10 <= s["ttft_s"]["p50"] <= 0.10 + TOL  # [.05 .05 .1 .2 .3]
    assert 0.26 <= s["ttft_s"]["p95"] <= 0.30 + TOL  # interpolated between 0.2 and 0.3
    assert s["itl_s"]["n"] == 3 * 4 + 1 and 0.04 <= s["itl_s"]["p50"] <= 0.04 + TOL
    assert 0.26 <= s["e2e_s"]["p50"] <= 0.36 + TOL
    assert s["e2e_s"]["std"] == pytest.approx(stdev([reqs[i].total for i in range(3)]))  # type: ignore[misc]
    assert 5 / (0.26 + TOL) <= reqs[0].tok_s <= 5 / 0.26  # type: ignore[operator]


def test_events_are_counted_without_usage_and_concurrency_is_bounded(scripted: Any) -> None:
    url, app = scripted({i: ("ok", 0.4, 3, 0.02, 99) for i in range(8)})  # long enough to overlap
    _, levels = asyncio.run(run_bench(_cfg(url, requests=8, concurrency=[4, 2], include_usage=False)))
    assert [lv.concurrency for lv in levels] == [4, 2]
    for lv in levels:
        s = summarize_level(lv)
        assert s["completed"] == 8 and s["errors"] == 0
        assert s["output_tokens"] == 8 * 3 and s["tokens_from_usage"] is False
    assert app.max_in_flight == 4


def test_wall_budget_and_request_timeout_stop_the_run(scripted: Any) -> None:
    url, _ = scripted({0: ("hang",), 1: ("hang",), 2: ("hang",)})
    t0 = time.monotonic()
    _, levels = asyncio.run(run_bench(_cfg(url, requests=3, concurrency=[2, 1], max_seconds=1.0)))
    assert time.monotonic() - t0 < 5
    assert len(levels) == 1  # the second level never began
    s = summarize_level(levels[0])
    assert s["errors"] == 3 and s["error_kinds"] == {"aborted": 2, "not_started": 1}
    _, levels = asyncio.run(run_bench(_cfg(url, requests=1, timeout_s=0.5)))
    assert levels[0].results[0].status == "timeout"


def test_cli_writes_result_json_and_prints_json_last(scripted: Any, tmp_path: Path, capsys: Any) -> None:
    url, _ = scripted({i: ("ok", 0.01, 2, 0.01, 2) for i in range(2)})
    out = tmp_path / "r.json"
    rc = main(["--url", url, "--concurrency", "1,2", "--requests", "2", "--seed", str(SEED), "--warmup", "0",
               "--label", "fake", "--out", str(out), "--quiet"])
    assert rc == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["label"] == "fake" and last["levels"]["2"]["errors"] == 0
    saved = json.loads(out.read_text())
    assert [lv["concurrency"] for lv in saved["levels"]] == [1, 2]
    assert len(saved["levels"][0]["requests"]) == 2 and saved["config"]["model"] == "scripted"


# --- safety ---------------------------------------------------------------------------------------

def test_only_loopback_without_allow_remote(capsys: Any) -> None:
    assert check_url("http://127.0.0.1:8082/v1", False) == "http://127.0.0.1:8082"
    assert check_url("http://localhost:8000", False) == "http://localhost:8000"
    assert check_url("http://[::1]:8000", False) == "http://[::1]:8000"
    for url in ("http://10.1.2.3:8082", "http://example.com", "http://127.0.0.1.example.com:80"):
        with pytest.raises(UnsafeTarget):
            check_url(url, False)
    assert check_url("http://10.1.2.3:8082", True) == "http://10.1.2.3:8082"
    assert main(["--url", "http://192.168.0.9:8082", "--quiet"]) == 2
    assert "--allow-remote" in capsys.readouterr().err
    assert main(["--url", "http://127.0.0.1:1", "--requests", "100000"]) == 2  # bounded count
    capsys.readouterr()
    assert main(["--url", f"http://127.0.0.1:{free_port()}", "--quiet"]) == 2  # nobody listening
    assert "cannot list models" in capsys.readouterr().err


# --- compare --------------------------------------------------------------------------------------

def _result(label: str, per_level: dict[int, tuple[float, float, int]]) -> dict[str, Any]:
    """A result with, per concurrency: (tok/s of each request over a 1 s wall, TTFT, errors)."""
    levels = []
    for c, (tok_s, ttft, errors) in per_level.items():
        ok = []
        for i in range(4):
            r = RequestResult(index=i, status="ok", ttft=ttft, itl=[0.05], events=2, usage_tokens=int(tok_s / 4), total=1.0)
            r.finish_reason, r.done = "stop", True
            ok.append(r)
        bad = [RequestResult(index=4 + k, status="cut", ttft=ttft, events=1, total=0.5) for k in range(errors)]
        levels.append(LevelRun(concurrency=c, planned=4 + errors, wall_s=1.0, results=ok + bad))
    return build_result(BenchConfig(base_url="http://127.0.0.1:1", model="m", label=label), "m", levels)


def test_compare_table_ratios_goals_and_png(tmp_path: Path, capsys: Any) -> None:
    anchor = _result("anchor", {1: (40, 0.2, 0), 8: (40, 2.0, 3)})
    ours = _result("ours", {1: (40, 0.2, 0), 8: (80, 0.5, 0)})
    buf = io.StringIO()
    print_comparison([anchor, ours], buf)
    text = buf.getvalue()
    assert "## concurrency 1" in text and "## concurrency 8" in text and "ours/anchor" in text
    row = next(line for line in text.split("## concurrency 8")[1].splitlines() if line.startswith("agg tok/s"))
    assert row.split()[2:5] == ["40.0", "80.0", "2"]
    r = ratios(anchor, ours)
    assert r["8"]["tok_s_ratio"] == pytest.approx(2.0) and r["8"]["ttft_p95_ratio"] == pytest.approx(0.25)
    assert r["8"]["errors"] == {"baseline": 3, "other": 0}
    assert goal_check(anchor, ours) == {"c1_tok_s_ge_0.98x": True, "c8_tok_s_ge_1.0x": True,
                                        "c8_ttft_p95_le_0.5x": True, "c8_zero_errors": True}
    assert goal_check(ours, anchor)["c8_zero_errors"] is False

    png = plot_comparison([anchor, ours], tmp_path / "plots" / "cmp.png")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000

    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(anchor))
    b.write_text(json.dumps(ours))
    capsys.readouterr()
    assert main(["--compare", str(a), str(b)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    last = json.loads(lines[-1])
    assert last["ratios"]["ours"]["8"]["tok_s_ratio"] == pytest.approx(2.0)
    assert Path(last["plot"]).stat().st_size > 0 and Path(last["plot"]).parent == tmp_path
    c = tmp_path / "bad.json"
    c.write_text("{}")
    assert main(["--compare", str(a), str(c)]) == 2  # not a bench result: a clear refusal

