#!/usr/bin/env python3
"""Long context (issue 21): how TTFT and decode speed grow with the prompt, SSM vs transformer.

Contestants, tiny random-weight F32 GGUFs of the same width (n_embd 64) written by
tests/backends/ssm_models.py, served by capibara6's plain llama.cpp backend (what a registry
entry with parallel 1 runs), one after another in this process, 1 thread:
  transformer  `llama`, 3 layers, 4 heads (2 KV): attention reads every cached position per token
  mamba2       `mamba2`, 2 layers, d_inner 128, d_state 16: a fixed state per sequence
  falcon-h1    `falcon-h1`, 2 layers: attention and a Mamba-2 mixer in every layer (hybrid)
At each prompt length (default 256, 2048, 8192 random token ids, a fresh prompt each time so no
prefix is reused) it measures TTFT (prefill + first token) and decode tok/s over --gen tokens
(end of sequence suppressed with logit_bias). Absolute times of tiny models say little about real
ones; the ratios do: `growth` is each model's value at a length over its own value at the
shortest, and `ssm_vs_transformer` divides the SSM's by the transformer's at the same length.
Widths are tiny, so the per-token work that does not depend on the context (the LM head, the
MLP) is small too, and the growth of attention shows more than it would on a 7B model.

usage: scripts/bench_long_context.py [--lengths 256,2048,8192] [--gen 64] [--threads 1] [--out FILE]
The last stdout line is JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from capibara6.backends.llamacpp.plain import LlamaCppBackend  # noqa: E402
from capibara6.config import parse_registry  # noqa: E402
from capibara6.types import GenerationOutcome, SamplingParams, TokenPrompt  # noqa: E402
from tests.backends.ssm_models import write_tiny_falcon_h1, write_tiny_mamba2, write_tiny_transformer  # noqa: E402

EOS = 2  # the tiny SPM vocabulary's </s>
FIRST_ID, LAST_ID = 3, 268  # ordinary tokens: bytes and words


def contestants(tmp: Path, n_ctx: int) -> dict[str, Path]:
    writers: dict[str, Callable[[Path], Path]] = {
        "transformer": lambda p: write_tiny_transformer(p, n_ctx=2 * n_ctx),  # trained length: no overflow warning
        "mamba2": lambda p: write_tiny_mamba2(p, dims={"n_ctx": 2 * n_ctx}),
        "falcon-h1": lambda p: write_tiny_falcon_h1(p, dims={"n_ctx": 2 * n_ctx}),
    }
    return {name: w(tmp / f"{name}.gguf") for name, w in writers.items()}


def load(path: Path, n_ctx: int, threads: int) -> LlamaCppBackend:
    entry = {"source": {"path": str(path)}, "chat_format": "chatml", "n_ctx": n_ctx, "n_threads": threads}
    spec = parse_registry({"models": {"m": entry}}).models["m"]
    return LlamaCppBackend.load("m", spec, path, threads)


def run_once(backend: LlamaCppBackend, prompt: list[int], gen: int) -> dict[str, float]:
    """TTFT (s) and decode tok/s of one greedy generation of exactly `gen` tokens."""
    params = SamplingParams(max_tokens=gen, temperature=0.0, logit_bias=((EOS, -100.0),))
    prepared = backend.prepare(TokenPrompt(tuple(prompt)))
    t0 = time.perf_counter()
    times = [time.perf_counter() for _ in backend.generate(prepared, params, GenerationOutcome(), threading.Event())]
    if len(times) < 2:
        raise RuntimeError(f"generated {len(times)} tokens, need at least 2")
    return {"ttft_s": times[0] - t0, "decode_tok_s": (len(times) - 1) / (times[-1] - times[0])}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="256,2048,8192", help="prompt lengths in tokens, comma-separated")
    ap.add_argument("--gen", type=int, default=64, help="tokens generated per run")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = ap.parse_args(argv)
    lengths = sorted(int(x) for x in args.lengths.split(","))
    n_ctx = lengths[-1] + args.gen + 64
    rng = np.random.default_rng(0)
    results: dict[str, dict[str, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in contestants(Path(tmp), n_ctx).items():
            backend = load(path, n_ctx, args.threads)
            try:
                run_once(backend, [1, *rng.integers(FIRST_ID, LAST_ID, 32).tolist()], 4)  # warm-up
                results[name] = {}
                for n in lengths:
                    prompt = [1, *rng.integers(FIRST_ID, LAST_ID, n - 1).tolist()]
                    results[name][str(n)] = run_once(backend, prompt, args.gen)
                    r = results[name][str(n)]
                    print(f"{name:12s} prompt {n:6d}: TTFT {r['ttft_s'] * 1000:8.1f} ms  decode {r['decode_tok_s']:8.1f} tok/s", flush=True)
            finally:
                backend.close()
    summary = summarise(results, lengths)
    for name, g in summary["growth"].items():
        print(f"{name:12s} growth {lengths[0]} -> {lengths[-1]}: TTFT x{g['ttft'][str(lengths[-1])]:.2f}, "
              f"decode tok/s x{g['decode_tok_s'][str(lengths[-1])]:.2f}")
    out: dict[str, Any] = {"bench": "long_context", "lengths": lengths, "gen": args.gen, "threads": args.threads,
                           "results": results, **summary}
    line = json.dumps(out)
    if args.out:
        args.out.write_text(line + "\n")
    print(line)
    return 0


def summarise(results: dict[str, dict[str, dict[str, float]]], lengths: list[int]) -> dict[str, Any]:
    """Ratios only: each model against its own shortest length, and each SSM against the transformer."""
    base = str(lengths[0])
    growth = {name: {"ttft": {str(n): r[str(n)]["ttft_s"] / r[base]["ttft_s"] for n in lengths},
                     "decode_tok_s": {str(n): r[str(n)]["decode_tok_s"] / r[base]["decode_tok_s"] for n in lengths}}
              for name, r in results.items()}
    ref = results["transformer"]
    versus = {name: {"ttft": {str(n): r[str(n)]["ttft_s"] / ref[str(n)]["ttft_s"] for n in lengths},
                     "decode_tok_s": {str(n): r[str(n)]["decode_tok_s"] / ref[str(n)]["decode_tok_s"] for n in lengths}}
              for name, r in results.items() if name != "transformer"}
    return {"growth": growth, "ssm_vs_transformer": versus}


if __name__ == "__main__":
    raise SystemExit(main())
