"""A fixed, seeded prompt set: the same seed gives the same prompts on every machine and run.

Prompts are built from small word lists with `random.Random(seed)` (not the global RNG), so two
contestants benchmarked in one run see byte-identical requests in the same order.
"""

from __future__ import annotations

import random

_SUBJECTS = [
    "the sea", "a lighthouse keeper", "mountain rivers", "the history of bread", "an old clock",
    "city gardens", "the moon landing", "winter in the north", "a small robot", "desert plants",
    "the printing press", "honey bees", "a train journey", "volcanoes", "the first computers",
    "coffee", "a forgotten library", "migrating birds", "glass making", "the night sky",
]
_TASKS = [
    "Write a short story about {s}.",
    "Explain to a child how {s} works.",
    "Describe {s} in a few sentences.",
    "List some interesting facts about {s}.",
    "Write a letter to a friend about {s}.",
    "Give a short lecture on {s}.",
]
_OPENERS = [
    "Once upon a time, {s}",
    "The most surprising thing about {s} is that",
    "Here is what everyone should know about {s}:",
    "In the beginning, {s}",
]


def make_prompts(n: int, seed: int = 0) -> list[str]:
    """`n` instruction-style prompts (for the chat endpoint)."""
    rng = random.Random(seed)
    return [rng.choice(_TASKS).format(s=rng.choice(_SUBJECTS)) for _ in range(n)]


def make_completion_prompts(n: int, seed: int = 0) -> list[str]:
    """`n` text openers (for the completions endpoint: a base model continues them)."""
    rng = random.Random(seed)
    return [rng.choice(_OPENERS).format(s=rng.choice(_SUBJECTS)) for _ in range(n)]
