"""Turn level runs into the result JSON and a text table.

Which requests feed which statistic (so numbers mean the same for every contestant):
- TTFT and ITL: every request that received a token, whatever its ending (a stream the server cut
  short still showed its first-token latency); `ttft_completed_s` is TTFT over completed requests
  only, for servers (llama-cpp-python's) that cut a running stream to start the next one;
- end-to-end latency, per-request tok/s and aggregate tok/s: completed (`ok`) requests only, since
  a cut stream's tokens are not a usable answer;
- errors: every request that did not end with [DONE] and a finish_reason, plus any never started.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
from collections import Counter
from pathlib import Path
from typing import Any, TextIO

from .client import OK
from .runner import BenchConfig, LevelRun
from .stats import summarize

SCHEMA = "capibara6-bench/1"


def summarize_level(level: LevelRun) -> dict[str, Any]:
    ok = [r for r in level.results if r.status == OK]
    answered = [r for r in level.results if r.ttft is not None]
    kinds = Counter(r.status for r in level.results if r.status != OK)
    not_started = level.planned - len(level.results)
    if not_started:
        kinds["not_started"] += not_started
    tokens = sum(r.tokens for r in ok)
    return {
        "concurrency": level.concurrency,
        "planned": level.planned,
        "completed": len(ok),
        "errors": sum(kinds.values()),
        "error_kinds": dict(kinds),
        "wall_s": level.wall_s,
        "output_tokens": tokens,
        "aggregate_tok_s": tokens / level.wall_s if level.wall_s > 0 else None,
        "tokens_from_usage": bool(ok) and all(r.usage_tokens is not None for r in ok),
        "ttft_s": summarize([r.ttft for r in answered if r.ttft is not None]),
        "ttft_completed_s": summarize([r.ttft for r in ok if r.ttft is not None]),  # a cut stream's quick start left out
        "itl_s": summarize([x for r in answered for x in r.itl]),
        "e2e_s": summarize([r.total for r in ok if r.total is not None]),
        "request_tok_s": summarize([r.tok_s for r in ok if r.tok_s is not None]),
    }


def build_result(cfg: BenchConfig, model: str, levels: list[LevelRun]) -> dict[str, Any]:
    config = {k: v for k, v in vars(cfg).items()}
    config["model"] = model
    return {
        "schema": SCHEMA,
        "label": cfg.label or cfg.base_url,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "config": config,
        "client_host": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "levels": [{**summarize_level(lv), "requests": [r.to_json() for r in lv.results]} for lv in levels],
    }


def write_result(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")


def load_result(path: Path) -> dict[str, Any]:
    data = json.loads(Path(path).read_text())
    if data.get("schema") != SCHEMA:
        raise ValueError(f"{path}: not a capibara6 bench result (schema {data.get('schema')!r})")
    return dict(data)


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.1f}"


def _num(x: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if x is None else fmt.format(x)


def print_table(result: dict[str, Any], out: TextIO) -> None:
    """One row per concurrency level; latencies in milliseconds."""
    print(f"# {result['label']}  model={result['config']['model']}  endpoint={result['config']['endpoint']}"
          f"  max_tokens={result['config']['max_tokens']}", file=out)
    head = (f"{'conc':>4} {'ok':>7} {'err':>4} {'agg tok/s':>9} {'req tok/s':>9} {'TTFT p50':>9} {'p95':>8} {'p99':>8}"
            f" {'ITL p50':>8} {'p95':>7} {'p99':>7} {'e2e p50':>8} {'p95':>8} {'e2e std':>8}")
    print(head, file=out)
    for lv in result["levels"]:
        t, i, e = lv["ttft_s"], lv["itl_s"], lv["e2e_s"]
        print(f"{lv['concurrency']:>4} {lv['completed']:>3}/{lv['planned']:<3} {lv['errors']:>4}"
              f" {_num(lv['aggregate_tok_s']):>9} {_num(lv['request_tok_s']['p50']):>9}"
              f" {_ms(t['p50']):>9} {_ms(t['p95']):>8} {_ms(t['p99']):>8}"
              f" {_ms(i['p50']):>8} {_ms(i['p95']):>7} {_ms(i['p99']):>7}"
              f" {_ms(e['p50']):>8} {_ms(e['p95']):>8} {_ms(e['std']):>8}", file=out)
        if lv["error_kinds"]:
            print(f"     errors: {lv['error_kinds']}", file=out)


def headline(result: dict[str, Any]) -> dict[str, Any]:
    """A compact per-level digest for a JSON last line."""
    return {str(lv["concurrency"]): {
        "agg_tok_s": lv["aggregate_tok_s"], "ttft_p95_s": lv["ttft_s"]["p95"], "itl_p95_s": lv["itl_s"]["p95"],
        "e2e_std_s": lv["e2e_s"]["std"], "errors": lv["errors"],
    } for lv in result["levels"]}
