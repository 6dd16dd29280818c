"""Summary statistics for latency samples: percentiles (linear interpolation), mean, std dev.

Kept dependency-free (no numpy) so the bench client runs anywhere the server's client does.
"""

from __future__ import annotations

import math
from typing import Sequence

PERCENTILES = (50, 95, 99)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between ranks, as numpy's default."""
    if not values:
        return math.nan
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} outside 0..100")
    xs = sorted(values)
    rank = (len(xs) - 1) * q / 100.0
    lo = math.floor(rank)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (rank - lo)


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def stdev(values: Sequence[float]) -> float:
    """Sample standard deviation (n-1); 0 for a single sample, NaN for none."""
    n = len(values)
    if n == 0:
        return math.nan
    if n == 1:
        return 0.0
    m = mean(values)
    return math.sqrt(sum((x - m) ** 2 for x in values) / (n - 1))


def summarize(values: Sequence[float]) -> dict[str, float | int | None]:
    """n, mean, std, min, p50, p95, p99, max; NaN becomes None so the result is valid JSON."""
    out: dict[str, float] = {"mean": mean(values), "std": stdev(values)}
    out["min"] = min(values) if values else math.nan
    for q in PERCENTILES:
        out[f"p{q}"] = percentile(values, q)
    out["max"] = max(values) if values else math.nan
    return {"n": len(values), **{k: (None if math.isnan(v) else v) for k, v in out.items()}}
