"""One consensus request: fan the prompt out to the experts, check the quorum, merge.

Each expert runs through `serving.Generation` (pool lease, worker thread, cancellation), so an
expert is leased, queued, metered and cancelled exactly like an ordinary request. The only
addition is the CPU thread split: while k local models generate at once, each runs with
`auto_threads(k)` threads (never more than its own setting) and gets its own count back before
its lease is released. Remote experts use no local CPU and are not counted.

`ConsensusRun.prepare()` does everything that can fail before a byte is sent (fan-out, quorum,
judge, starting the aggregator), so failures become status codes; `pieces()` then yields the final
text: the chosen answer at once (fastest/vote/judge) or the aggregator's tokens as they come.
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import replace
from typing import Any, AsyncIterator, Sequence

from ..backends import capabilities
from ..errors import ExpertsFailed
from ..serving import ChoiceEnd, Delta, Generation, Messages, Plan, PromptSource, Service
from ..threads import auto_threads, resolve_threads
from .fanout import ExpertAnswer, ExpertCall, ExpertResult, ExpertTask, fan_out
from .routing import ConsensusPlan
from .strategies import Candidate, agreement, judge_order, judge_prompt, parse_verdict, synthesis_prompt, vote

log = logging.getLogger("capibara6.consensus")
JUDGE_MAX_TOKENS = 8


class ExpertGeneration(Generation):
    """A Generation run with a given CPU thread count; the model's own count is restored after."""

    def __init__(self, service: Service, plan: Plan, threads: int | None) -> None:
        super().__init__(service, plan)
        self._threads = threads

    def _launch(self, index: int, prompt: PromptSource) -> Any:
        backend = self._backend
        assert backend is not None
        own = backend.current_threads()  # None: not ours to change (a batch's shared context, a remote)
        if self._threads and own is not None and self._threads != own:
            backend.set_threads(self._threads)
            # pushed before the stream's aclose, so it runs after the worker has left the model
            self._stack.callback(backend.set_threads, own)
        return super()._launch(index, prompt)


def question_of(prompt: PromptSource) -> str:
    """The text the judge and aggregator are asked about: the last user message, or the prompt."""
    if isinstance(prompt, str):
        return prompt
    if prompt and isinstance(prompt[0], dict):
        users = [m for m in prompt if m.get("role") == "user"]
        return str((users or list(prompt))[-1].get("content", ""))
    return ""


async def run_model(service: Service, model: str, prompt: PromptSource, base: Plan, seed: int, threads: int | None,
                    temperature: float | None = None, **overrides: Any) -> ExpertAnswer:
    """One model call to the end (through the pool), as an ExpertAnswer."""
    params = replace(base.params, seed=seed)
    if temperature is not None:
        params = replace(params, temperature=temperature)
    fields: dict[str, Any] = {k: v for k, v in overrides.items() if k != "max_tokens"}
    params = replace(params, **fields)
    max_tokens = overrides.get("max_tokens", base.max_tokens)
    plan = Plan(model, base.chat, [prompt], 1, max_tokens, params)
    text: list[str] = []
    finish = None
    async with ExpertGeneration(service, plan, threads) as gen:
        await gen.start()
        async for ev in gen.events():
            if isinstance(ev, Delta):
                text.append(ev.text)
            elif isinstance(ev, ChoiceEnd):
                finish = ev.finish_reason
        u = gen.usage.as_dict()
    return ExpertAnswer("".join(text), u["prompt_tokens"], u["completion_tokens"], finish)


class ConsensusRun:
    """One consensus request. `await prepare()`, iterate `pieces()`, then read `report()`; `aclose()`."""

    def __init__(self, service: Service, plan: ConsensusPlan, base: Plan, *, call: ExpertCall | None = None,
                 split_threads: bool = True) -> None:
        self.service = service
        self.plan = plan
        self.base = base
        self.prompt = base.prompts[0]
        self.seed = base.params.seed if base.params.seed is not None else random.getrandbits(31)
        self.split_threads = split_threads
        self._call = call or self._expert_call
        self.results: list[ExpertResult] = []
        self.chosen: ExpertResult | None = None
        self.agreement: float | None = None
        self.tally: dict[str, int] = {}
        self.judge_info: dict[str, Any] | None = None
        self.aggregator_info: dict[str, Any] | None = None
        self.finish_reason: str | None = None
        self._aggregator: Generation | None = None
        self._extra_usage = [0, 0]  # judge / aggregator (prompt, completion)
        self.metrics = service.pool.metrics

    # -- fan-out ------------------------------------------------------------------------------

    def tasks(self) -> list[ExpertTask]:
        registry = self.service.registry
        split = auto_threads(self.concurrency()) if self.split_threads and self.concurrency() else None
        out = []
        for i, model in enumerate(self.plan.experts):
            spec = registry.models[model]
            threads = None
            if split is not None and capabilities(spec).local:  # a remote expert takes no local CPU share
                threads = min(split, resolve_threads(spec.n_threads))
            out.append(ExpertTask(i, model, (self.seed + 7919 * i) & 0x7FFFFFFF, threads))
        return out

    def concurrency(self) -> int:
        """Local generations that can run at once: repeats of one model share its `parallel` slots."""
        registry = self.service.registry
        counts: dict[str, int] = {}
        for m in self.plan.experts:
            if registry.models[m].backend != "remote":
                counts[m] = counts.get(m, 0) + 1
        return sum(min(n, registry.models[m].parallel) for m, n in counts.items())

    async def _expert_call(self, task: ExpertTask) -> ExpertAnswer:
        return await run_model(self.service, task.model, self.prompt, self.base, task.seed, task.threads, self.plan.temperature)

    async def prepare(self) -> None:
        plan = self.plan
        self.results = await fan_out(self.tasks(), self._call, plan.timeout_s, first_wins=plan.strategy == "fastest")
        for r in self.results:
            if r.status != "cancelled":
                self.metrics.expert_latency.labels(r.task.model).observe(r.latency_s)
        ok = [r for r in self.results if r.ok]
        need = 1 if plan.strategy == "fastest" else plan.min_responses
        if len(ok) < need:
            reasons = "; ".join(r.reason() for r in self.results if not r.ok)
            raise ExpertsFailed(f"{len(ok)} of {len(self.results)} experts answered, {need} needed: {reasons}")
        candidates = [self._candidate(r) for r in ok]
        if plan.strategy == "fastest":
            first = min(ok, key=lambda r: r.latency_s)
            self._choose(first, candidates)
            self.agreement = None  # the others were cancelled: nothing to agree with
        elif plan.strategy == "judge":
            await self._judge(ok, candidates)
        else:
            self._vote(ok, candidates)
            if plan.strategy == "synthesize":
                await self._start_aggregator(ok)
        if self.agreement is not None:
            self.metrics.agreement.observe(self.agreement)

    def _candidate(self, r: ExpertResult) -> Candidate:
        assert r.answer is not None
        return Candidate.of(r.task.index, r.task.model, r.answer.text, self.service.registry.models[r.task.model].priority)

    def _choose(self, r: ExpertResult, candidates: Sequence[Candidate]) -> None:
        self.chosen = r
        mine = next(c for c in candidates if c.index == r.task.index)
        self.agreement = agreement(candidates, mine)
        self.finish_reason = r.answer.finish_reason if r.answer else None

    def _vote(self, ok: list[ExpertResult], candidates: list[Candidate]) -> None:
        result = vote(candidates)
        self.tally = result.tally
        self._choose(next(r for r in ok if r.task.index == result.winner.index), candidates)

    # -- judge --------------------------------------------------------------------------------

    async def _judge(self, ok: list[ExpertResult], candidates: list[Candidate]) -> None:
        judge = self.plan.judge
        assert judge is not None
        order = judge_order(len(ok), self.seed)
        texts = [r.answer.text for r in ok if r.answer]
        prompt: Messages = [{"role": "user", "content": judge_prompt(question_of(self.prompt), texts, order)}]
        # a judge whose backend has no grammar engine answers freely; parse_verdict reads its number
        constrained = capabilities(self.service.registry.models[judge]).grammar
        grammar = "root ::= " + " | ".join(f'"{i}"' for i in range(1, len(ok) + 1)) if constrained else None
        info: dict[str, Any] = {"model": judge, "order": [ok[i].task.index for i in order], "constrained": constrained}
        picked = None
        try:
            ans = await asyncio.wait_for(
                run_model(self.service, judge, prompt, self._meta_plan(), self.seed, None, 0.0,
                          grammar=grammar, max_tokens=JUDGE_MAX_TOKENS, stop=()),
                self.plan.timeout_s,
            )
            self._bill(ans)
            info["verdict"] = ans.text
            picked = parse_verdict(ans.text, order)
        except asyncio.TimeoutError:
            info["error"] = f"timeout after {self.plan.timeout_s:g} s"
        except Exception as err:  # a failed judge falls back to the vote, reported
            info["error"] = getattr(err, "message", None) or str(err)
        if picked is None:
            info["fallback"] = "vote"
            self._vote(ok, candidates)
        else:
            self._choose(ok[picked], candidates)
        self.judge_info = info

    # -- synthesize ---------------------------------------------------------------------------

    def _meta_plan(self) -> Plan:
        """The request as a chat plan: judge and aggregator always get an instruction message."""
        return replace(self.base, chat=True, echo=False)

    async def _start_aggregator(self, ok: list[ExpertResult]) -> None:
        model = self.plan.aggregator
        assert model is not None
        texts = [r.answer.text for r in ok if r.answer]
        messages: Messages = [{"role": "user", "content": synthesis_prompt(question_of(self.prompt), texts)}]
        base = self._meta_plan()
        params = replace(base.params, seed=self.seed)
        gen = Generation(self.service, Plan(model, True, [messages], 1, base.max_tokens, params))
        try:
            await asyncio.wait_for(gen.start(), self.plan.timeout_s)
        except BaseException as err:
            await gen.aclose()
            if isinstance(err, asyncio.CancelledError):
                raise
            reason = getattr(err, "message", None) or str(err) or type(err).__name__
            self.aggregator_info = {"model": model, "error": reason, "fallback": "vote"}
            return  # the vote already chose an answer
        self._aggregator = gen
        self.aggregator_info = {"model": model}

    # -- output -------------------------------------------------------------------------------

    async def pieces(self) -> AsyncIterator[str]:
        """The final answer's text: the aggregator's tokens as they come, else the chosen answer."""
        gen = self._aggregator
        if gen is None:
            assert self.chosen is not None and self.chosen.answer is not None
            yield self.chosen.answer.text
            return
        async for ev in gen.events():
            if isinstance(ev, Delta):
                if ev.text:
                    yield ev.text
            elif isinstance(ev, ChoiceEnd):
                self.finish_reason = ev.finish_reason
        u = gen.usage.as_dict()
        self._extra_usage[0] += u["prompt_tokens"]
        self._extra_usage[1] += u["completion_tokens"]
        if self.aggregator_info is not None:
            self.aggregator_info.update(prompt_tokens=u["prompt_tokens"], completion_tokens=u["completion_tokens"])

    def _bill(self, ans: ExpertAnswer) -> None:
        self._extra_usage[0] += ans.prompt_tokens
        self._extra_usage[1] += ans.completion_tokens

    def usage(self) -> dict[str, int]:
        """Every finished model call: experts, judge, aggregator."""
        prompt = sum(r.answer.prompt_tokens for r in self.results if r.answer) + self._extra_usage[0]
        completion = sum(r.answer.completion_tokens for r in self.results if r.answer) + self._extra_usage[1]
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def report(self) -> dict[str, Any]:
        """The response's `consensus` field."""
        experts = []
        for r in self.results:
            a = r.answer
            experts.append({
                "model": r.task.model,
                "status": r.status,
                "latency_s": round(r.latency_s, 3),
                "prompt_tokens": a.prompt_tokens if a else 0,
                "completion_tokens": a.completion_tokens if a else 0,
                "answer": a.text if a else None,
                "extracted": Candidate.of(0, "", a.text).key if a else None,
                "threads": r.task.threads,
                **({"error": r.error} if r.error else {}),
            })
        out: dict[str, Any] = {
            "strategy": self.plan.strategy,
            "ensemble": self.plan.name,
            "experts": experts,
            "chosen": {"expert": self.chosen.task.model, "index": self.chosen.task.index} if self.chosen else None,
            "agreement": None if self.agreement is None else round(self.agreement, 4),
        }
        if self.tally:
            out["votes"] = self.tally
        if self.plan.route:
            out["route"] = self.plan.route
        if self.judge_info:
            out["judge"] = self.judge_info
        if self.aggregator_info:
            out["aggregator"] = self.aggregator_info
            if self._aggregator is not None:
                out["chosen"] = {"aggregator": self.aggregator_info["model"]}
        return out

    async def aclose(self) -> None:
        if self._aggregator is not None:
            await self._aggregator.aclose()
