"""A short real benchmark run: `capibara6 bench` against a real capibara6 server and model on loopback."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from capibara6.bench.report import summarize_level
from capibara6.bench.runner import BenchConfig, run_bench
from tests.conftest import gemma_registry
from tests.serverproc import ROOT, ServerProcess


@pytest.fixture(scope="module")
def live(gemma_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(gemma_registry(gemma_path), tmp_path_factory.mktemp("bench")).wait_healthy()
    yield proc
    proc.stop()


def test_cli_run_against_capibara6(live: ServerProcess, tmp_path: Path) -> None:
    out = tmp_path / "capibara6.json"
    cmd = [sys.executable, "-m", "capibara6", "bench", "--url", live.url["standard"], "--concurrency", "1,2",
           "--requests", "3", "--max-tokens", "8", "--label", "capibara6", "--out", str(out), "--quiet"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    last = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(last["levels"]) == {"1", "2"}
    result = json.loads(out.read_text())
    assert result["config"]["model"] == "gemma3-270m"  # discovered from /v1/models
    for level in result["levels"]:
        assert level["completed"] == 3 and level["errors"] == 0
        assert level["tokens_from_usage"] is True  # capibara6 honours stream_options.include_usage
        assert level["output_tokens"] == sum(r["usage_tokens"] for r in level["requests"])
        assert level["aggregate_tok_s"] > 0 and level["ttft_s"]["n"] == 3
        for r in level["requests"]:
            assert r["finish_reason"] in ("length", "stop") and r["done"]
            assert 1 <= r["events"] <= r["usage_tokens"] <= 8
            assert len(r["itl"]) == r["events"] - 1
            assert 0 < r["ttft"] <= r["total"]


def test_chat_endpoint_at_concurrency_two(live: ServerProcess) -> None:
    cfg = BenchConfig(base_url=live.url["streaming"], endpoint="chat", concurrency=[2], requests=2,
                      max_tokens=6, warmup=0, max_seconds=120)
    model, levels = asyncio.run(run_bench(cfg))
    s = summarize_level(levels[0])
    assert model == "gemma3-270m" and s["completed"] == 2 and s["errors"] == 0
    assert all(r.tokens <= 6 and r.ttft is not None for r in levels[0].results)
