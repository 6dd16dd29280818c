"""`capibara6 bench`: run the serving benchmark, or compare saved results (`--compare A.json B.json`).

Safe by design: loopback URLs only unless `--allow-remote`, a capped request count per level and a
wall-time budget for the whole run, after which in-flight requests are cancelled.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import sys
from pathlib import Path
from typing import Any, Sequence, TextIO
from urllib.parse import urlsplit

import httpx

from .compare import goal_check, plot_comparison, print_comparison, ratios
from .report import build_result, headline, load_result, print_table, write_result
from .runner import MAX_CONCURRENCY, MAX_REQUESTS_PER_LEVEL, MAX_WALL_S, BenchConfig, run_bench


class UnsafeTarget(ValueError):
    """The URL is not loopback and --allow-remote was not given."""


def check_url(url: str, allow_remote: bool) -> str:
    """An http(s) base URL; a host other than localhost / 127.0.0.0/8 / ::1 needs `allow_remote`.
    Host names other than `localhost` are not resolved: a name could point anywhere."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    host = parts.hostname
    loopback = host == "localhost"
    if not loopback:
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
    if not loopback and not allow_remote:
        raise UnsafeTarget(f"{host} is not a loopback address; pass --allow-remote to benchmark another machine")
    return url.rstrip("/").removesuffix("/v1")


def _levels(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"concurrency levels are comma-separated integers: {text!r}") from err


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default="http://127.0.0.1:8082", help="base URL of an OpenAI-compatible server")
    p.add_argument("--model", default=None, help="model id (default: the first from GET /v1/models)")
    p.add_argument("--endpoint", choices=("chat", "completions"), default="completions")
    p.add_argument("--concurrency", type=_levels, default=[1, 2, 4, 8], help=f"levels, e.g. 1,2,4,8 (each at most {MAX_CONCURRENCY})")
    p.add_argument("--requests", type=int, default=8, help=f"requests per level (max {MAX_REQUESTS_PER_LEVEL})")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="prompt set and sampling seed")
    p.add_argument("--no-usage", action="store_true", help="do not ask for the usage chunk (count SSE events)")
    p.add_argument("--extra-body", default=None, help="JSON object merged into every request body")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    p.add_argument("--max-seconds", type=float, default=600.0, help=f"wall-time budget of the run (max {MAX_WALL_S:.0f})")
    p.add_argument("--warmup", type=int, default=1, help="untimed requests first")
    p.add_argument("--label", default="", help="name of this contestant in reports")
    p.add_argument("--out", type=Path, default=None, help="result JSON file")
    p.add_argument("--allow-remote", action="store_true", help="allow a non-loopback URL")
    p.add_argument("--compare", nargs="+", type=Path, default=None, metavar="RESULT.json",
                   help="compare saved results (the first is the baseline) instead of running")
    p.add_argument("--plot", type=Path, default=None, help="PNG for --compare (default: next to the first file)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    extra = json.loads(args.extra_body) if args.extra_body else {}
    if not isinstance(extra, dict):
        raise ValueError("--extra-body must be a JSON object")
    return BenchConfig(
        base_url=check_url(args.url, args.allow_remote), model=args.model, endpoint=args.endpoint,
        concurrency=args.concurrency, requests=args.requests, max_tokens=args.max_tokens, seed=args.seed,
        include_usage=not args.no_usage, timeout_s=args.timeout, max_seconds=args.max_seconds,
        warmup=args.warmup, label=args.label, extra_body=extra,
    )


def run_compare(paths: list[Path], plot: Path | None, out: TextIO) -> dict[str, Any]:
    results = [load_result(p) for p in paths]
    print_comparison(results, out)
    png = plot_comparison(results, plot or paths[0].with_name("compare.png"))
    print(f"\nplot: {png}", file=out)
    return {"baseline": results[0]["label"], "plot": str(png),
            "ratios": {r["label"]: ratios(results[0], r) for r in results[1:]},
            "goals": {r["label"]: goal_check(results[0], r) for r in results[1:]}}


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Execute parsed `bench` arguments; on success the last stdout line is one JSON object."""
    out = out or sys.stdout  # looked up per call, so a replaced sys.stdout is honoured
    try:
        if args.compare:
            if len(args.compare) < 2:
                raise ValueError("--compare needs at least two result files")
            summary = run_compare(args.compare, args.plot, out)
        else:
            cfg = config_from_args(args)
            log = (lambda _: None) if args.quiet else (lambda m: print(f"bench: {m}", file=sys.stderr, flush=True))
            model, levels = asyncio.run(run_bench(cfg, log=log))
            result = build_result(cfg, model, levels)
            if args.out:
                write_result(result, args.out)
            print_table(result, out)
            summary = {"label": result["label"], "result": str(args.out) if args.out else None, "levels": headline(result)}
    except (ValueError, OSError, RuntimeError, httpx.HTTPError) as err:  # a clear line, not a traceback
        print(f"capibara6 bench: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary), file=out)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="capibara6 bench", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))

