#!/usr/bin/env python3
"""Decode under a tool-call grammar on the llama.cpp backend: capibara6's constrained pick vs
llama.cpp's own grammar sampler (`LlamaGrammar` in the chain) vs no grammar, one run, same model,
prompt and threads. Greedy, so the constrained runs must give the same tokens (checked).

    python scripts/bench_grammar.py [--model-path X.gguf] [--tokens 80] [--rounds 2]

Prints tok/s per side and the ratios to the unconstrained decode; JSON on the last line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path
from typing import Any

from capibara6.backends import model_path
from capibara6.backends.llamacpp.plain import LlamaCppBackend
from capibara6.config import load_registry, parse_registry
from capibara6.tools.formats import HermesFormat
from capibara6.tools.spec import ToolChoice, parse_tools
from capibara6.types import GenerationOutcome, SamplingParams, TextPrompt

SCHEMA = {"type": "object", "properties": {
    "title": {"type": "string"}, "date": {"type": "string"},
    "attendees": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 5},
    "location": {"type": "object", "properties": {"building": {"type": "string"}, "room": {"type": "integer", "minimum": 1, "maximum": 999}},
                 "required": ["building", "room"]}},
    "required": ["title", "date", "attendees", "location"]}
PROMPT = ("<|im_start|>user\nPut a meeting called 'Budget review' on 2025-03-14 with Ana and Luis in building B "
          "room 204.<|im_end|>\n<|im_start|>assistant\n")


def grammar() -> str:
    tools = parse_tools([{"type": "function", "function": {"name": "create_event", "parameters": SCHEMA}}])
    return HermesFormat().full_grammar(tools, ToolChoice("named", "create_event"), False)


def decode(backend: LlamaCppBackend, params: SamplingParams) -> tuple[float, list[int]]:
    """(decode tok/s after the first token, the tokens)."""
    prepared = backend.prepare(TextPrompt(PROMPT))
    ids: list[int] = []
    first = 0.0
    for ev in backend.generate(prepared, params, GenerationOutcome(), threading.Event()):
        if not ids:
            first = time.perf_counter()
        ids.append(ev.token_id)
    return (len(ids) - 1) / (time.perf_counter() - first), ids


def chain_decode(backend: LlamaCppBackend, gbnf: str, n: int) -> tuple[float, list[int]]:
    """The same prompt through Llama.generate with LlamaGrammar (llama.cpp's chain masks every token)."""
    from llama_cpp import LlamaGrammar

    llm = backend.llm
    llm.reset()
    ids: list[int] = []
    first = 0.0
    for tok in llm.generate(llm.tokenize(PROMPT.encode(), special=True), temp=0.0, grammar=LlamaGrammar.from_string(gbnf, verbose=False)):
        if not ids:
            first = time.perf_counter()
        if llm.token_eos() == tok or len(ids) >= n or tok == 151645:
            break
        ids.append(int(tok))
    return (len(ids) - 1) / (time.perf_counter() - first), ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-path", type=Path)
    ap.add_argument("--tokens", type=int, default=80)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    path = args.model_path
    if path is None:
        registry = load_registry(Path("models.yaml"))
        path = model_path(registry.models["qwen2.5-coder-0.5b"], registry.base_dir)
    assert path is not None
    spec = parse_registry({"models": {"m": {"source": {"path": str(path)}, "n_ctx": 1024, "n_threads": 1}}}, Path(".")).models["m"]
    backend = LlamaCppBackend.load("m", spec, Path(path), 1)
    gbnf = grammar()
    rates: dict[str, list[float]] = {"none": [], "capibara6": [], "llama.cpp chain": []}
    tokens: dict[str, list[int]] = {}
    for _ in range(args.rounds):  # interleaved, so the box's drift hits every side alike
        rates["none"].append(decode(backend, SamplingParams(max_tokens=args.tokens, temperature=0.0))[0])
        rate, tokens["capibara6"] = decode(backend, SamplingParams(max_tokens=args.tokens, temperature=0.0, grammar=gbnf))
        rates["capibara6"].append(rate)
        rate, tokens["llama.cpp chain"] = chain_decode(backend, gbnf, args.tokens)
        rates["llama.cpp chain"].append(rate)
    backend.close()
    med = {k: statistics.median(v) for k, v in rates.items()}
    n = min(len(tokens["capibara6"]), len(tokens["llama.cpp chain"]))
    same = tokens["capibara6"][:n] == tokens["llama.cpp chain"][:n]
    for k, v in med.items():
        print(f"{k:16s} {v:6.1f} tok/s  {v / med['none']:.2f}x unconstrained")
    print(f"constrained tokens identical (first {n}): {same}")
    out: dict[str, Any] = {"model": str(path), "tok_s": med, "ratio_to_unconstrained": {k: v / med["none"] for k, v in med.items()},
                           "capibara6_vs_chain": med["capibara6"] / med["llama.cpp chain"], "same_tokens": same, "rounds": args.rounds}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
