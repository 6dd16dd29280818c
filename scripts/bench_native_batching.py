#!/usr/bin/env python3
"""Native continuous batching (issue 19): native batched vs native one-at-a-time vs llama.cpp batched.

Three contestants, one after another in one run, each a `capibara6 serve` process on loopback with
a temporary models.yaml holding one entry, on the same GGUF, `n_threads` and `prefill_chunk`
(`isolation` left at its default):
  native-batched    backend native,   parallel P, kv_cache fp8, n_ctx = --n-ctx (the whole budget)
  native-single     backend native,   parallel 1, kv_cache fp8, n_ctx = --n-ctx // P (one request's share)
  llamacpp-batched  backend llamacpp, parallel P, default kv cache, n_ctx = --n-ctx (unified cells)
n_ctx is the KV budget of an instance: the batched contestants share --n-ctx tokens between their
P sequences (llama.cpp: n_ctx unified cells; native: one KV pool), the one-at-a-time contestant
holds one sequence, so it gets that sequence's share. The native engine allocates KV as it is
used, so n_ctx bounds memory, not cost. Before a native change that batches, `backend: native`
with parallel P runs P separate one-sequence instances (each with n_ctx).

Each contestant is driven by the seeded `capibara6 bench` client (capibara6/bench, run in this
process) at every concurrency level on the same prompts (greedy, the bench's default), after an
untimed warm round of max(levels) concurrent short requests (loads every instance or slot).
The table and the issue's ratios go to stdout; the last stdout line is one JSON object. KV bytes
per token for fp8 vs fp32 come from the GGUF header (engine KVCache.bytes_per_token); the
servers' `capibara6_kv_cache_bytes` after each run is reported next to them. The machine state
(load average before/after, CPU count) says whether the box was quiet.

usage: scripts/bench_native_batching.py [--model PATH] [--threads 1] [--parallel 8]
         [--concurrency 1,4,8] [--requests 16] [--max-tokens 64] [--n-ctx 2048] [--prefill-chunk 256]
         [--contestants native-batched,native-single,llamacpp-batched] [--out bench-out/native-batching]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scheduler import ROOT, free_port, gguf_path, ratio, stop, wait_up  # noqa: E402

CONTESTANTS = ("native-batched", "native-single", "llamacpp-batched")
MODEL_ID = "bench-model"
QUIET_LOAD_PER_CPU = 0.25  # 1-min load average per CPU below which the box counts as quiet


def _levels(text: str) -> list[int]:
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"concurrency levels are comma-separated integers: {text!r}") from err
    if not levels or any(c < 1 for c in levels):
        raise argparse.ArgumentTypeError(f"concurrency levels must be positive: {text!r}")
    return levels


def _contestants(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [n for n in names if n not in CONTESTANTS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"contestants are a comma-separated subset of {','.join(CONTESTANTS)}: {text!r}")
    return [n for n in CONTESTANTS if n in names]  # fixed order, no repeats


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--model", default=None, help="GGUF path (default: Gemma 3 270M Q4_K_M from its PyPI package)")
    ap.add_argument("--chat-format", default=None, help="chat_format of the entry (default: gemma for a gemma3 GGUF, else the GGUF's template)")
    ap.add_argument("--threads", type=int, default=1, help="n_threads of every contestant")
    ap.add_argument("--parallel", type=int, default=8, help="P: sequences of the batched contestants")
    ap.add_argument("--concurrency", type=_levels, default=[1, 4, 8], help="client levels, e.g. 1,4,8")
    ap.add_argument("--requests", type=int, default=16, help="requests per level")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--endpoint", choices=["chat", "completions"], default="chat")
    ap.add_argument("--seed", type=int, default=0, help="prompt set and sampling seed (the same for all)")
    ap.add_argument("--n-ctx", type=int, default=2048, help="KV budget of the batched contestants (native-single: this // P)")
    ap.add_argument("--prefill-chunk", type=int, default=256)
    ap.add_argument("--max-seconds", type=float, default=1800.0, help="wall-time budget of each contestant's levels")
    ap.add_argument("--contestants", type=_contestants, default=list(CONTESTANTS), help="a comma-separated subset")
    ap.add_argument("--out", type=Path, default=Path("bench-out/native-batching"), help="registries, server logs, results")
    args = ap.parse_args(argv)
    if args.threads < 1 or args.parallel < 1 or args.requests < 1 or args.max_tokens < 1:
        ap.error("--threads, --parallel, --requests and --max-tokens must be positive")
    if args.n_ctx // args.parallel < 64:
        ap.error(f"--n-ctx {args.n_ctx} leaves native-single {args.n_ctx // args.parallel} tokens (at least 64)")
    return args


def entry(label: str, args: argparse.Namespace, gguf: str, chat_format: str | None) -> dict[str, Any]:
    """The one models.yaml entry of a contestant."""
    spec: dict[str, Any] = {"source": {"path": gguf}, "n_threads": args.threads, "prefill_chunk": args.prefill_chunk,
                            "idle_unload_s": 0, "max_queue": 256}
    if chat_format:
        spec["chat_format"] = chat_format
    if label == "native-batched":
        spec.update(backend="native", parallel=args.parallel, kv_cache="fp8", n_ctx=args.n_ctx)
    elif label == "native-single":
        spec.update(backend="native", parallel=1, kv_cache="fp8", n_ctx=args.n_ctx // args.parallel)
    elif label == "llamacpp-batched":
        spec.update(backend="llamacpp", parallel=args.parallel, n_ctx=args.n_ctx)
    else:
        raise ValueError(f"unknown contestant {label!r}")
    return spec


def registry(label: str, args: argparse.Namespace, gguf: str, chat_format: str | None) -> dict[str, Any]:
    return {"pool": {"max_loaded": 1, "warmup": [MODEL_ID]}, "models": {MODEL_ID: entry(label, args, gguf, chat_format)}}


@contextmanager
def server(label: str, reg: dict[str, Any], out: Path) -> Iterator[str]:
    """A capibara6 server for `reg` on a free loopback port; its base URL once /ready. The server
    runs in its own session, so its workers go with it: whatever is left of the group after
    `stop` is killed (on errors and Ctrl-C too)."""
    config = out / f"{label}.yaml"
    config.write_text(yaml.safe_dump(reg, sort_keys=False))
    port = free_port()
    cmd = [sys.executable, "-m", "capibara6", "serve", "--config", str(config), "--role", "standard", "--port", str(port)]
    print(f"bench_native_batching: {label}: {' '.join(cmd)}", file=sys.stderr, flush=True)
    with (out / f"{label}.log").open("wb") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_up(proc, url + "/ready", timeout=300)
            yield url
        finally:
            stop(proc)
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # leftovers of its session (workers), if any
            except (ProcessLookupError, PermissionError):
                pass


def kv_metric(url: str) -> float | None:
    """Sum of capibara6_kv_cache_bytes over the server's models (None if not exported)."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = httpx.get(url + "/metrics", timeout=10).text
    except httpx.HTTPError:
        return None
    for fam in text_string_to_metric_families(text):
        if fam.name == "capibara6_kv_cache_bytes":
            return sum(s.value for s in fam.samples)
    return None


def drive(url: str, label: str, args: argparse.Namespace, out: Path) -> dict[int, dict[str, Any]]:
    """Warm round, then the timed levels; per level the bench's summary (capibara6/bench/report.py)."""
    from capibara6.bench.report import build_result, write_result
    from capibara6.bench.runner import BenchConfig, run_bench

    top = max(args.concurrency)
    warm = BenchConfig(base_url=url, model=MODEL_ID, endpoint=args.endpoint, concurrency=[top], requests=top,
                       max_tokens=min(8, args.max_tokens), seed=args.seed, warmup=0, label=f"{label}-warm")
    cfg = BenchConfig(base_url=url, model=MODEL_ID, endpoint=args.endpoint, concurrency=args.concurrency,
                      requests=args.requests, max_tokens=args.max_tokens, seed=args.seed, warmup=0,
                      max_seconds=args.max_seconds, timeout_s=max(120.0, args.max_seconds / 4), label=label)
    asyncio.run(run_bench(warm))

    def log(m: str) -> None:
        print(f"bench_native_batching: {label}: {m}", file=sys.stderr, flush=True)

    model, levels = asyncio.run(run_bench(cfg, log=log))
    result = build_result(cfg, model, levels)
    write_result(result, out / f"{label}.json")
    return {lv["concurrency"]: lv for lv in result["levels"]}


def kv_bytes_per_token(gguf: str) -> dict[str, Any]:
    """Native KV bytes per token (all layers) for fp32/fp16/fp8 from the GGUF header, and what
    llama.cpp's default f16 cache takes (capibara6/gguf_header.py)."""
    from capibara6.engine.gguf_loader import read_config
    from capibara6.engine.kv_cache import KV_DTYPES, KVCache
    from capibara6.gguf_header import kv_cache_bytes, read_header

    meta = read_header(gguf).metadata
    out: dict[str, Any] = {"llamacpp_f16": kv_cache_bytes(meta, 1, None)}
    try:
        c = read_config(meta)
    except Exception as err:  # an architecture the native engine does not run
        out["error"] = f"{type(err).__name__}: {err}"
        return out
    for dt in KV_DTYPES:  # bytes_per_token reads only the shapes: no ops module, nothing allocated
        kv = KVCache(None, n_layer=c.n_layer, n_ctx=1, n_head_kv=c.n_head_kv, head_dim_k=c.head_dim_k,  # type: ignore[arg-type]
                     head_dim_v=c.head_dim_v, dtype=dt)
        out[f"native_{dt}"] = kv.bytes_per_token()
    out["fp8_vs_fp32"] = ratio(out["native_fp8"], out["native_fp32"])
    return out


def cells(runs: dict[str, dict[int, dict[str, Any]]]) -> dict[str, dict[str, dict[str, Any]]]:
    """{contestant: {"c<N>": figures}} from the bench level summaries."""
    return {label: {f"c{c}": {
        "agg_tok_s": None if lv["aggregate_tok_s"] is None else round(lv["aggregate_tok_s"], 2),
        "ttft_p50_s": lv["ttft_s"].get("p50"),
        "ttft_p95_s": lv["ttft_s"].get("p95"),
        "completed": lv["completed"],
        "errors": lv["errors"],
    } for c, lv in sorted(levels.items())} for label, levels in runs.items()}


def ratios(table: dict[str, dict[str, dict[str, Any]]], top: int, kv: dict[str, Any]) -> dict[str, float | None]:
    def get(label: str, c: int, key: str) -> float | None:
        return table.get(label, {}).get(f"c{c}", {}).get(key)

    return {
        f"native_batched_vs_llamacpp_batched_tok_s_c{top}": ratio(get("native-batched", top, "agg_tok_s"), get("llamacpp-batched", top, "agg_tok_s")),
        f"native_batched_vs_llamacpp_batched_ttft_p95_c{top}": ratio(get("native-batched", top, "ttft_p95_s"), get("llamacpp-batched", top, "ttft_p95_s")),
        f"native_batched_vs_native_single_tok_s_c{top}": ratio(get("native-batched", top, "agg_tok_s"), get("native-single", top, "agg_tok_s")),
        "native_batched_vs_native_single_tok_s_c1": ratio(get("native-batched", 1, "agg_tok_s"), get("native-single", 1, "agg_tok_s")),
        "kv_fp8_vs_fp32_bytes_per_token": kv.get("fp8_vs_fp32"),
    }


def goals(r: dict[str, float | None], table: dict[str, dict[str, dict[str, Any]]], top: int) -> dict[str, bool | None]:
    def at_least(x: float | None, g: float) -> bool | None:
        return None if x is None else x >= g

    def at_most(x: float | None, g: float) -> bool | None:
        return None if x is None else x <= g

    nb = table.get("native-batched")
    return {
        f"c{top}_tok_s_ge_1.0x_llamacpp_batched": at_least(r[f"native_batched_vs_llamacpp_batched_tok_s_c{top}"], 1.0),
        f"c{top}_ttft_p95_le_1.0x_llamacpp_batched": at_most(r[f"native_batched_vs_llamacpp_batched_ttft_p95_c{top}"], 1.0),
        f"c{top}_tok_s_ge_3x_native_single": at_least(r[f"native_batched_vs_native_single_tok_s_c{top}"], 3.0),
        "c1_tok_s_ge_0.98x_native_single": at_least(r["native_batched_vs_native_single_tok_s_c1"], 0.98),
        "kv_fp8_le_0.27x_fp32": at_most(r["kv_fp8_vs_fp32_bytes_per_token"], 0.27),
        "native_batched_zero_errors": None if nb is None else all(v["errors"] == 0 for v in nb.values()),
    }


def _f(x: float | None, scale: float = 1.0, fmt: str = "{:.2f}") -> str:
    return "-" if x is None else fmt.format(x * scale)


def print_table(table: dict[str, dict[str, dict[str, Any]]], r: dict[str, Any], g: dict[str, Any],
                kv: dict[str, Any], machine: dict[str, Any]) -> None:
    print(f"{'contestant':<18} {'conc':>4} {'ok':>7} {'agg tok/s':>9} {'TTFT p50 ms':>11} {'p95 ms':>8}")
    for label, row in table.items():
        for c, v in row.items():
            print(f"{label:<18} {c[1:]:>4} {v['completed']:>3}/{v['completed'] + v['errors']:<3} {_f(v['agg_tok_s']):>9}"
                  f" {_f(v['ttft_p50_s'], 1000, '{:.0f}'):>11} {_f(v['ttft_p95_s'], 1000, '{:.0f}'):>8}")
    print()
    for k, v in r.items():
        print(f"{k:<52} {_f(v, fmt='{:.3f}'):>7}")
    print("KV bytes/token: " + ", ".join(f"{k}={v}" for k, v in kv.items()))
    print("goals: " + ", ".join(f"{k}={v}" for k, v in g.items()))
    print(f"machine: {machine['state']}, {machine['cpus']} CPUs, load avg before {machine['loadavg_before']},"
          f" after {machine['loadavg_after']}")


def machine_state(before: tuple[float, ...], after: tuple[float, ...]) -> dict[str, Any]:
    cpus = os.cpu_count() or 1
    quiet = before[0] < QUIET_LOAD_PER_CPU * cpus
    return {"cpus": cpus, "loadavg_before": [round(x, 2) for x in before], "loadavg_after": [round(x, 2) for x in after],
            "state": "quiet" if quiet else "loaded", "quiet_rule": f"1-min load before < {QUIET_LOAD_PER_CPU} x CPUs"}


def build_report(args: argparse.Namespace, runs: dict[str, dict[int, dict[str, Any]]], kv: dict[str, Any],
                 kv_held: dict[str, float | None], machine: dict[str, Any], **about: Any) -> dict[str, Any]:
    """The last-line JSON: settings, per contestant and level figures, the issue's ratios and goals."""
    top = max(args.concurrency)
    table = cells(runs)
    r = ratios(table, top, kv)
    return {
        "bench": "native_batching", **about, "threads": args.threads, "parallel": args.parallel, "n_ctx": args.n_ctx,
        "n_ctx_single": args.n_ctx // args.parallel, "prefill_chunk": args.prefill_chunk, "endpoint": args.endpoint,
        "concurrency": args.concurrency, "requests": args.requests, "max_tokens": args.max_tokens, "seed": args.seed,
        "contestants": args.contestants, "out": str(args.out), "results": table, "ratios": r, "goals": goals(r, table, top),
        "kv_bytes_per_token": kv, "kv_cache_bytes_metric": kv_held, "machine": machine,
    }


def _sigterm(_sig: int, _frame: object) -> None:
    raise SystemExit(143)  # unwind: every `server` block stops its process


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored (`cmd &`)
    out = args.out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    gguf = args.model or gguf_path()
    from capibara6.gguf_header import read_header

    arch = read_header(gguf).metadata.get("general.architecture")
    chat_format = args.chat_format or ("gemma" if arch == "gemma3" else None)
    kv = kv_bytes_per_token(gguf)
    before = os.getloadavg()
    t0 = time.monotonic()
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    kv_held: dict[str, float | None] = {}
    for label in args.contestants:
        with server(label, registry(label, args, gguf, chat_format), out) as url:
            runs[label] = drive(url, label, args, out)
            kv_held[label] = kv_metric(url)
    machine = {**machine_state(before, os.getloadavg()), "wall_s": round(time.monotonic() - t0, 1)}
    doc = build_report(args, runs, kv, kv_held, machine, model=gguf, arch=arch, chat_format=chat_format)
    print_table(doc["results"], doc["ratios"], doc["goals"], kv, machine)
    print(json.dumps(doc))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # the servers are stopped by then (see `server`)
        print("bench_native_batching: interrupted", file=sys.stderr)
        sys.exit(130)
