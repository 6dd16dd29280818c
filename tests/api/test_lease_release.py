"""A generation returns its lease as soon as its last choice's stream is closed, before the
response's own end (the last chunks, [DONE]), so a client's next request to the model does not
wait for that teardown; the request is still counted once."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any, Iterator

from capibara6.config import ServerSettings, parse_registry
from capibara6.pool import ModelPool
from capibara6.serving import ChoiceEnd, Delta, Plan, Service
from capibara6.types import GenerationOutcome, SamplingParams, TokenEvent
from tests.fakes import FakeBackendBase


class Words(FakeBackendBase):
    def generate(self, prompt: Any, params: SamplingParams, outcome: GenerationOutcome, cancel: threading.Event) -> Iterator[TokenEvent]:
        outcome.prompt_tokens = prompt.n_tokens

        def run() -> Iterator[TokenEvent]:
            for w in ("a", " b", " c"):
                outcome.completion_tokens += 1
                yield TokenEvent(1, w)
            outcome.finish_reason = "stop"

        return run()


def test_the_lease_goes_back_when_the_last_choice_ends_not_after_the_response() -> None:
    registry = parse_registry({"models": {"m": {"source": {"path": "/nonexistent/m.gguf"}, "n_threads": 1}}}, Path("."))
    pool = ModelPool(registry, loader=lambda mid, spec, n: Words())
    service = Service(registry, pool, ServerSettings())
    plan = Plan("m", False, ["x y"], 2, 8, SamplingParams(temperature=0.0))

    async def main() -> list[tuple[str, str, float]]:
        seen: list[tuple[str, str, float]] = []  # (event, model status, running gauge) as each event comes
        async with service.generation(plan) as gen:
            await gen.start()
            async for ev in gen.events():
                kind = "end" if isinstance(ev, ChoiceEnd) else "delta" if isinstance(ev, Delta) else "?"
                seen.append((kind, pool.status("m"), pool.metrics.running._value.get()))
            seen.append(("after", pool.status("m"), pool.metrics.running._value.get()))
        seen.append(("closed", pool.status("m"), pool.metrics.running._value.get()))
        return seen

    seen = asyncio.run(main())
    ends = [s for s in seen if s[0] == "end"]
    assert [k for k, _, _ in seen].count("delta") == 6 and len(ends) == 2
    assert ends[0][1:] == ("busy", 1)  # the second choice still needs the model
    assert ends[1][1:] == ("ready", 0)  # given back before the last choice's end is handed on
    assert all(s[1:] == ("busy", 1) for s in seen[: seen.index(ends[0])])
    assert seen[-2:] == [("after", "ready", 0), ("closed", "ready", 0)]  # counted once: the gauge never goes below 0
    assert pool.metrics.generation_tokens.labels("m")._value.get() == 6
