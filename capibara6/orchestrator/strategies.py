"""Merge maths, as pure functions (no I/O): plurality vote, the judge's prompt and verdict, the
aggregator's prompt.

Vote: answers are grouped by their extracted key (extract.py); the largest group wins; a tie goes
to the group holding the highest declared priority (ModelSpec.priority), then to the expert listed
first. When no answer has a key, the highest-priority expert's answer wins. The agreement ratio is
the share of answering experts whose key equals the winner's.

Judge ("Universal Self-Consistency", Chen et al. 2023): one model sees the numbered answers in an
order shuffled with the request seed (so position bias does not always favour expert 1) and names
the most consistent one; a verdict we cannot parse falls back to the vote.

Synthesize (Mixture-of-Agents, Wang et al. 2024, one layer): an aggregator model gets the question
and the numbered expert answers and writes the final answer.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Sequence

from .extract import extract_answer


@dataclass(frozen=True)
class Candidate:
    """One expert's successful answer, as the merge sees it."""

    index: int  # position in the request's expert list
    expert: str
    text: str
    priority: int = 0
    key: str | None = None

    @classmethod
    def of(cls, index: int, expert: str, text: str, priority: int = 0) -> Candidate:
        return cls(index, expert, text, priority, extract_answer(text))


@dataclass(frozen=True)
class VoteResult:
    winner: Candidate
    agreement: float  # share of candidates with the winner's key
    tally: dict[str, int]  # key -> votes (keys only)


def _rank(c: Candidate) -> tuple[int, int]:
    """Sort key: higher priority first, then the earlier-listed expert."""
    return (-c.priority, c.index)


def agreement(candidates: Sequence[Candidate], chosen: Candidate) -> float:
    if not candidates or chosen.key is None:
        return 1.0 / max(1, len(candidates))
    return sum(c.key == chosen.key for c in candidates) / len(candidates)


def vote(candidates: Sequence[Candidate]) -> VoteResult:
    """Plurality over extracted keys; ties by priority, then listing order."""
    if not candidates:
        raise ValueError("vote needs at least one candidate")
    groups: dict[str, list[Candidate]] = {}
    for c in candidates:
        if c.key is not None:
            groups.setdefault(c.key, []).append(c)
    tally = {k: len(v) for k, v in groups.items()}
    if not groups:
        winner = min(candidates, key=_rank)
        return VoteResult(winner, agreement(candidates, winner), tally)
    best = min(groups.values(), key=lambda g: (-len(g), min(_rank(c) for c in g)))  # most votes, then trust
    winner = min(best, key=_rank)  # the group's most trusted member speaks for it
    return VoteResult(winner, agreement(candidates, winner), tally)


def judge_order(n: int, seed: int) -> list[int]:
    """The order the judge sees the answers in: a permutation of range(n) fixed by the seed."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order


def judge_prompt(question: str, answers: Sequence[str], order: Sequence[int]) -> str:
    """The judge's user message: the question and the answers numbered 1..n in `order`."""
    lines = [
        "Several answers to the same question follow. Pick the answer that is most consistent "
        "with the majority of the answers.",
        "",
        f"Question: {question.strip()}",
        "",
    ]
    for shown, original in enumerate(order, 1):
        lines.append(f"Answer {shown}: {answers[original].strip()}")
    lines += ["", f"Reply with the number (1-{len(order)}) of the most consistent answer only."]
    return "\n".join(lines)


_VERDICT = re.compile(r"(?i:answer|response|number)?\s*#?\s*(\d+)")


def parse_verdict(text: str, order: Sequence[int]) -> int | None:
    """The original index the judge chose, or None when no number in 1..n appears."""
    for m in _VERDICT.finditer(text):
        shown = int(m.group(1))
        if 1 <= shown <= len(order):
            return order[shown - 1]
    return None


def synthesis_prompt(question: str, answers: Sequence[str]) -> str:
    """The aggregator's user message: the question and the numbered references."""
    refs = "\n".join(f"{i}. {a.strip()}" for i, a in enumerate(answers, 1))
    return (
        "You have been given answers from several models to the question below. Some may be wrong. "
        "Critically evaluate them and write one correct, well-written answer. Do not mention the "
        f"other answers.\n\nQuestion: {question.strip()}\n\nAnswers:\n{refs}\n\nYour answer:"
    )
