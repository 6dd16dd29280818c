#!/usr/bin/env python3
"""Benchmark capibara6 kernels vs numpy (OpenBLAS) at the same thread count.

    python scripts/bench_kernels.py [--threads 1,2] [--quick]

For each thread count a child process is started with OPENBLAS_NUM_THREADS (and OMP/MKL) set to
it, and kernels.set_num_threads(n). Times are medians over several repetitions. The last line
printed is one JSON object: {"threads": {n: {metric: value}}, "ratios": {...}} where a ratio > 1
means capibara6 is faster than numpy.
"""
import argparse
import json
import os
import subprocess
import sys
import time

MATMUL_SHAPES = {  # name: (M, N, K)   y[M,N] = x[M,K] @ w[N,K]^T
    "gemv_1x640_2048": (1, 2048, 640),
    "gemv_1x640_262144": (1, 262144, 640),
    "gemm_128x640_2048": (128, 2048, 640),
    "gemm_512x2048_640": (512, 640, 2048),
}


def bench(fn, min_reps=5, min_time=0.25, max_reps=200):
    return bench2(fn, None, min_reps, min_time, max_reps)[0]


def bench2(fa, fb, min_reps=5, min_time=0.25, max_reps=200, rounds=3):
    """Median times of fa and fb, measured in alternating blocks (a-block, b-block, x rounds) so
    that load from other processes on a shared machine hits both alike. Blocks, not single calls:
    OpenBLAS worker threads spin for a while after each call and would starve the other side."""
    fns = [f for f in (fa, fb) if f is not None]
    ts = [[] for _ in fns]
    for _ in range(rounds):
        for f, t in zip(fns, ts):
            # OpenBLAS workers spin ~2^28 cycles (~0.1 s) after a call before they sleep: let them
            # settle so they do not take the second core from whichever side runs next
            time.sleep(0.25)
            f()  # warm up
            t_end = time.perf_counter() + min_time / rounds
            n = 0
            while n < max(1, min_reps // rounds + 1) or (time.perf_counter() < t_end and n < max_reps // rounds):
                t0 = time.perf_counter()
                f()
                t.append(time.perf_counter() - t0)
                n += 1
    return [sorted(t)[len(t) // 2] for t in ts] + [None] * (2 - len(fns))


def child(nt, quick):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import numpy as np

    from capibara6 import kernels
    kernels.set_num_threads(nt)
    rng = np.random.default_rng(0)
    res = {}
    for name, (M, N, K) in MATMUL_SHAPES.items():
        if quick and N > 100000:
            continue
        x = rng.standard_normal((M, K), dtype=np.float32)
        w = rng.standard_normal((N, K), dtype=np.float32)
        y = np.empty((M, N), np.float32)
        t_c6, t_np = bench2(lambda: kernels.matmul(x, w, out=y), lambda: np.matmul(x, w.T, out=y))
        flops = 2.0 * M * N * K
        res[name] = {"c6_gflops": flops / t_c6 / 1e9, "np_gflops": flops / t_np / 1e9,
                     "ratio": t_np / t_c6}
        if M == 1:
            dst = np.empty_like(w)
            t_c6, t_cp = bench2(lambda: kernels.matmul(x, w, out=y), lambda: np.copyto(dst, w))
            res[name].update({"c6_GBps": w.nbytes / t_c6 / 1e9, "copy_GBps": w.nbytes / t_cp / 1e9,
                              "vs_copy": t_cp / t_c6})
            del dst

    def np_softmax(a):
        e = np.exp(a - a.max(axis=-1, keepdims=True))
        e /= e.sum(axis=-1, keepdims=True)
        return e

    xs = rng.standard_normal((16, 32768), dtype=np.float32) * 4
    ys = np.empty_like(xs)
    def ratio(f_np, f_c6):
        t_np, t_c6 = bench2(f_np, f_c6)
        return {"ratio": t_np / t_c6, "c6_us": t_c6 * 1e6}

    res["softmax_16x32768"] = ratio(lambda: np_softmax(xs), lambda: kernels.softmax(xs, out=ys))
    xr = rng.standard_normal((512, 2048), dtype=np.float32)
    wr = rng.standard_normal(2048, dtype=np.float32)
    yr = np.empty_like(xr)
    res["rmsnorm_512x2048"] = ratio(lambda: xr / np.sqrt(np.mean(xr * xr, axis=-1, keepdims=True) + 1e-6) * wr,
                                    lambda: kernels.rmsnorm(xr, wr, 1e-6, out=yr))
    g = rng.standard_normal((512, 2048), dtype=np.float32)
    u = rng.standard_normal((512, 2048), dtype=np.float32)
    res["swiglu_512x2048"] = ratio(lambda: g / (1 + np.exp(-g)) * u, lambda: kernels.swiglu(g, u, out=yr))
    c = np.float32(np.sqrt(2 / np.pi))
    res["geglu_512x2048"] = ratio(lambda: 0.5 * g * (1 + np.tanh(c * (g + np.float32(0.044715) * g * g * g))) * u,
                                  lambda: kernels.geglu(g, u, out=yr))

    # attention, gemma3-270m-like heads: Hq=4, Hkv=1, D=256
    S, Hq, Hkv, D = 4096, 4, 1, 256
    kf = rng.standard_normal((S, Hkv, D), dtype=np.float32)
    vf = rng.standard_normal((S, Hkv, D), dtype=np.float32)
    k8, ks = kernels.fp8_quantize_rows(kf)
    v8, vs = kernels.fp8_quantize_rows(vf)
    for T, n_past in ((1, S - 1), (128, S - 128)):
        q = rng.standard_normal((T, Hq, D), dtype=np.float32)
        o = np.empty_like(q)
        t32, t8 = bench2(lambda: kernels.attention(q, kf, vf, n_past=n_past, scale=0.0625, out=o),
                         lambda: kernels.attention(q, k8, v8, n_past=n_past, scale=0.0625, k_scale=ks,
                                                   v_scale=vs, out=o), min_reps=3)
        res[f"attention_T{T}_S{S}"] = {"fp32_ms": t32 * 1e3, "fp8_ms": t8 * 1e3, "fp8_vs_fp32": t32 / t8}
    xq = rng.standard_normal((4096, 256), dtype=np.float32)
    res["fp8_quantize_rows_4096x256_ms"] = {"ms": bench(lambda: kernels.fp8_quantize_rows(xq)) * 1e3}
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--quick", action="store_true", help="skip the 671 MB 262144x640 GEMV")
    ap.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.quick)))
        return
    out = {}
    for nt in [int(t) for t in a.threads.split(",")]:
        env = dict(os.environ, OPENBLAS_NUM_THREADS=str(nt), OMP_NUM_THREADS=str(nt), MKL_NUM_THREADS=str(nt))
        cmd = [sys.executable, os.path.abspath(__file__), "--child", str(nt)] + (["--quick"] if a.quick else [])
        r = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
        if r.returncode:
            sys.exit(f"benchmark child (threads={nt}) failed with rc={r.returncode}")
        res = json.loads(r.stdout.strip().splitlines()[-1])
        out[nt] = res
        print(f"== threads={nt} (OPENBLAS_NUM_THREADS={nt})")
        for k, v in res.items():
            print(f"  {k:32s} " + "  ".join(f"{kk}={vv:.3g}" for kk, vv in v.items()))
    ratios = {f"t{nt}": {k: round(v.get("ratio", v.get("fp8_vs_fp32", v.get("ms", 0))), 3)
                         for k, v in res.items()} for nt, res in out.items()}
    for nt, res in out.items():
        for k, v in res.items():
            if "vs_copy" in v:
                ratios[f"t{nt}"][k + "_vs_copy"] = round(v["vs_copy"], 3)
    print(json.dumps({"ratios": ratios, "threads": out}, separators=(",", ":")))


if __name__ == "__main__":
    main()
