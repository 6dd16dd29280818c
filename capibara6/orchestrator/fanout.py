"""Run expert calls in parallel with a per-expert deadline, and report every expert's fate.

An expert call is any `ExpertCall`: an async function that answers one `ExpertTask` (the product
uses service.py's, which runs a model through the pool; tests inject slow or failing ones). A call
that raises or answers nothing is dropped with status `error`, one that misses the deadline with status `timeout`
(it is cancelled, so its lease is released). `first_wins=True` (strategy `fastest`) returns as
soon as one expert gives a non-empty answer and cancels the rest (status `cancelled`). Cancelling
`fan_out` itself (client disconnect) cancels every expert and waits until each has let go of its
model before re-raising.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Literal, Sequence

Status = Literal["ok", "timeout", "error", "cancelled"]


@dataclass(frozen=True)
class ExpertTask:
    index: int  # position in the expert list
    model: str
    seed: int
    threads: int | None  # CPU threads for this call (None: the model's own setting)


@dataclass(frozen=True)
class ExpertAnswer:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None


@dataclass(frozen=True)
class ExpertResult:
    task: ExpertTask
    status: Status
    latency_s: float
    answer: ExpertAnswer | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok" and self.answer is not None

    def reason(self) -> str:
        """One line for error messages: 'm (#2): timeout after 3.0 s'."""
        detail = self.error or self.status
        return f"{self.task.model} (#{self.task.index + 1}): {detail}"


ExpertCall = Callable[[ExpertTask], Awaitable[ExpertAnswer]]


async def _run_one(call: ExpertCall, task: ExpertTask, timeout_s: float, clock: Callable[[], float]) -> ExpertResult:
    t0 = clock()
    try:
        answer = await asyncio.wait_for(call(task), timeout_s)
    except asyncio.TimeoutError:
        return ExpertResult(task, "timeout", clock() - t0, error=f"timeout after {timeout_s:g} s")
    except asyncio.CancelledError:
        raise
    except Exception as err:  # any failure drops this expert only; the reason is reported
        message = getattr(err, "message", None) or str(err) or type(err).__name__
        return ExpertResult(task, "error", clock() - t0, error=message)
    if not answer.text.strip():
        return ExpertResult(task, "error", clock() - t0, answer=answer, error="empty answer")
    return ExpertResult(task, "ok", clock() - t0, answer=answer)


async def fan_out(
    tasks: Sequence[ExpertTask],
    call: ExpertCall,
    timeout_s: float,
    *,
    first_wins: bool = False,
    clock: Callable[[], float] = time.monotonic,
) -> list[ExpertResult]:
    """Every task's result, in task order (see the module docstring)."""
    t0 = clock()
    running = {asyncio.ensure_future(_run_one(call, t, timeout_s, clock)): t for t in tasks}
    results: dict[int, ExpertResult] = {}
    try:
        pending = set(running)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for fut in done:
                r = fut.result()
                results[r.task.index] = r
            if first_wins and any(r.ok for r in results.values()):
                break
    finally:
        await _cancel_all(running)  # no-op for finished ones; on our own cancellation, all of them
    for fut, task in running.items():
        if task.index not in results:
            results[task.index] = ExpertResult(task, "cancelled", clock() - t0, error="cancelled: another expert answered first")
    return [results[t.index] for t in tasks]


async def _cancel_all(futures: dict[asyncio.Task[ExpertResult], ExpertTask]) -> None:
    live = [f for f in futures if not f.done()]
    for f in live:
        f.cancel()
    if live:
        # shielded so a second cancellation cannot leave a lease held by a half-cancelled expert
        await asyncio.shield(asyncio.gather(*live, return_exceptions=True))
