"""Before/after comparison of bench results: a text table of ratios and a PNG plot.

The first result is the baseline; every other result is shown against it. Ratios are
other/baseline, so for tok/s higher is better and for latencies lower is better.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TextIO

# (label, path into a level summary, unit scale, "higher" | "lower" is better)
METRICS: list[tuple[str, tuple[str, ...], float, str]] = [
    ("agg tok/s", ("aggregate_tok_s",), 1.0, "higher"),
    ("req tok/s p50", ("request_tok_s", "p50"), 1.0, "higher"),
    ("TTFT p50 ms", ("ttft_s", "p50"), 1000.0, "lower"),
    ("TTFT p95 ms", ("ttft_s", "p95"), 1000.0, "lower"),
    ("TTFT p99 ms", ("ttft_s", "p99"), 1000.0, "lower"),
    ("TTFT p95 ok ms", ("ttft_completed_s", "p95"), 1000.0, "lower"),
    ("ITL p50 ms", ("itl_s", "p50"), 1000.0, "lower"),
    ("ITL p95 ms", ("itl_s", "p95"), 1000.0, "lower"),
    ("e2e p50 ms", ("e2e_s", "p50"), 1000.0, "lower"),
    ("e2e p95 ms", ("e2e_s", "p95"), 1000.0, "lower"),
    ("e2e std ms", ("e2e_s", "std"), 1000.0, "lower"),
    ("errors", ("errors",), 1.0, "lower"),
]


def _get(level: dict[str, Any], path: tuple[str, ...]) -> float | None:
    cur: Any = level
    for key in path:
        cur = cur.get(key) if isinstance(cur, dict) else None
    return None if cur is None else float(cur)


def _levels(result: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {int(lv["concurrency"]): lv for lv in result["levels"]}


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or a == 0:
        return None
    return b / a


def ratios(base: dict[str, Any], other: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per shared concurrency level: other/base for tok/s and p95 TTFT, and both error counts."""
    b, o = _levels(base), _levels(other)
    out: dict[str, dict[str, Any]] = {}
    for c in sorted(set(b) & set(o)):
        out[str(c)] = {
            "tok_s_ratio": _ratio(_get(b[c], ("aggregate_tok_s",)), _get(o[c], ("aggregate_tok_s",))),
            "ttft_p95_ratio": _ratio(_get(b[c], ("ttft_s", "p95")), _get(o[c], ("ttft_s", "p95"))),
            "itl_p95_ratio": _ratio(_get(b[c], ("itl_s", "p95")), _get(o[c], ("itl_s", "p95"))),
            "errors": {"baseline": b[c]["errors"], "other": o[c]["errors"]},
        }
    return out


def goal_check(base: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """The issue-8 goals of `other` against the anchor `base`: at the highest shared level,
    tok/s >= 1.0x, p95 TTFT <= 0.5x and zero errors; at concurrency 1, tok/s >= 0.98x."""
    r = ratios(base, other)
    out: dict[str, Any] = {}
    if "1" in r:
        t = r["1"]["tok_s_ratio"]
        out["c1_tok_s_ge_0.98x"] = t is not None and t >= 0.98
    levels = sorted((int(c) for c in r), reverse=True)
    if levels and levels[0] > 1:
        top = r[str(levels[0])]
        t, p = top["tok_s_ratio"], top["ttft_p95_ratio"]
        out[f"c{levels[0]}_tok_s_ge_1.0x"] = t is not None and t >= 1.0
        out[f"c{levels[0]}_ttft_p95_le_0.5x"] = p is not None and p <= 0.5
        out[f"c{levels[0]}_zero_errors"] = top["errors"]["other"] == 0
    return out


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.0f}" if abs(x) >= 1000 else f"{x:.3g}" if abs(x) < 10 else f"{x:.1f}"


def print_comparison(results: list[dict[str, Any]], out: TextIO) -> None:
    """Per concurrency level: each metric for every result, then other/baseline ratios."""
    if len(results) < 2:
        raise ValueError("compare needs at least two results")
    labels = [r["label"] for r in results]
    shared = sorted(set.intersection(*(set(_levels(r)) for r in results)))
    print("baseline: " + labels[0] + "   (ratio = other / baseline)", file=out)
    cols = labels + [f"{lab}/{labels[0]}" for lab in labels[1:]]
    width = max(12, *(len(c) + 1 for c in cols))
    for c in shared:
        print(f"\n## concurrency {c}", file=out)
        print(f"{'metric':<16}" + "".join(f"{col:>{width}}" for col in cols) + "  better", file=out)
        levels = [_levels(r)[c] for r in results]
        for name, path, scale, better in METRICS:
            vals = [_get(lv, path) for lv in levels]
            shown = [None if v is None else v * scale for v in vals]
            rs = [_ratio(vals[0], v) for v in vals[1:]] if name != "errors" else [None] * (len(vals) - 1)
            cells = [str(int(v)) if name == "errors" and v is not None else _fmt(v) for v in shown] + [_fmt(v) for v in rs]
            print(f"{name:<16}" + "".join(f"{c:>{width}}" for c in cells) + f"  {better}", file=out)
    missing = sorted(set.union(*(set(_levels(r)) for r in results)) - set(shared))
    if missing:
        print(f"\n(levels not in every result, not compared: {missing})", file=out)


def plot_comparison(results: list[dict[str, Any]], path: Path) -> Path:
    """A 2x2 PNG: TTFT and end-to-end latency distributions per level (box plots), aggregate
    tok/s and p95 TTFT against concurrency (lines), one colour per result."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a server; must precede pyplot
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    concs = sorted(set.union(*(set(_levels(r)) for r in results)))
    width = 0.8 / len(results)
    for k, res in enumerate(results):
        colour = colours[k % len(colours)]
        lv = _levels(res)
        for ax, pick in ((axes[0][0], _ttfts), (axes[0][1], _e2es)):
            data = [[x * 1000 for x in pick(lv[c])] if c in lv else [] for c in concs]
            pos = [i + (k - (len(results) - 1) / 2) * width for i in range(len(concs))]
            keep = [(p, d) for p, d in zip(pos, data) if d]
            if keep:
                bp = ax.boxplot([d for _, d in keep], positions=[p for p, _ in keep], widths=width * 0.9,
                                patch_artist=True, showfliers=True, medianprops={"color": "black"})
                for box in bp["boxes"]:
                    box.set_facecolor(colour)
                    box.set_alpha(0.6)
            ax.plot([], [], color=colour, label=res["label"], linewidth=6, alpha=0.6)
        xs = [c for c in concs if c in lv]
        axes[1][0].plot(xs, [lv[c]["aggregate_tok_s"] or 0 for c in xs], marker="o", color=colour, label=res["label"])
        for c in xs:  # errors beside the throughput they cost, so a fast but failing server shows it
            if lv[c]["errors"]:
                axes[1][0].annotate(f"{lv[c]['errors']} err", (c, lv[c]["aggregate_tok_s"] or 0), color=colour,
                                    textcoords="offset points", xytext=(4, 4), fontsize=8)
        axes[1][1].plot(xs, [(lv[c]["ttft_s"]["p95"] or 0) * 1000 for c in xs], marker="o", color=colour, label=res["label"])
    for ax, title in ((axes[0][0], "TTFT per request (ms)"), (axes[0][1], "end-to-end latency, completed (ms)")):
        ax.set_xticks(range(len(concs)), [str(c) for c in concs])
        ax.set_xlabel("concurrency")
        ax.set_title(title)
        ax.legend()
    for ax, title in ((axes[1][0], "aggregate output tok/s"), (axes[1][1], "p95 TTFT (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(concs, [str(c) for c in concs])
        ax.set_xlabel("concurrency")
        ax.set_title(title)
        ax.set_ylim(bottom=0)  # ratios read honestly only from a zero baseline
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(" vs ".join(r["label"] for r in results))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _ttfts(level: dict[str, Any]) -> list[float]:
    return [r["ttft"] for r in level.get("requests", []) if r.get("ttft") is not None]


def _e2es(level: dict[str, Any]) -> list[float]:
    return [r["total"] for r in level.get("requests", []) if r.get("status") == "ok" and r.get("total") is not None]
