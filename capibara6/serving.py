"""Completion logic: requests in, backend-neutral events out. Knows nothing of HTTP.

A `Plan` is a validated request. `Generation` leases the model, runs each choice in a worker
thread (`TokenStream`) and yields `Delta` / `ChoiceEnd` events; the API layer frames them as JSON
or SSE. Callers `start()` (every error up to the first token raises there) or, when streaming,
`open()` (refusals and prompt errors raise there; `on_wait` tells when the request starts to
wait in the queue, the moment a stream sends its headers), then iterate.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
import uuid
from contextlib import AsyncExitStack
from dataclasses import dataclass, field, replace
from typing import Any, AsyncIterator, Callable, Iterator, Sequence, cast

from .backends import capabilities, model_path
from .backends.base import Backend
from .config import Registry, ServerSettings
from .errors import ApiError, ContextTooLong, InvalidRequest, ModelNotFound
from .gguf_header import read_header
from .metrics import RequestTimer
from .pool import ModelPool
from .token_stream import TokenStream
from .tool_use import ChatTraits, ToolRequest, ToolRun, chat_traits, resolve, run_auto
from .types import (
    BackendError,
    ChatPrompt,
    ContextLengthExceeded,
    GenerationOutcome,
    Prompt,
    SamplingParams,
    TextPrompt,
    TokenEvent,
    TokenPrompt,
    Unsupported,
)
from .workers.launch import CallLimits, finish_call

Messages = list[dict[str, Any]]
PromptSource = str | list[int] | Messages  # completion text, token ids, or chat messages


@dataclass(frozen=True)
class Plan:
    model: str
    chat: bool
    prompts: list[PromptSource]
    n: int
    max_tokens: int | None  # None: up to the context (capped)
    params: SamplingParams  # max_tokens there is a placeholder
    echo: bool = False
    tools: ToolRequest | None = None  # chat only: the request's tools, checked (capibara6/tool_use.py)

    def choices(self) -> list[tuple[int, PromptSource]]:
        """(choice index, prompt) for every prompt x n, in OpenAI's index order."""
        return [(i * self.n + j, p) for i, p in enumerate(self.prompts) for j in range(self.n)]


@dataclass(frozen=True)
class Delta:
    index: int
    text: str
    event: TokenEvent | None = None
    echo: bool = False  # the prompt text returned by `echo`


@dataclass(frozen=True)
class ChoiceEnd:
    index: int
    finish_reason: str | None


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    per_prompt: dict[int, int] = field(default_factory=dict)
    cached: dict[int, int] = field(default_factory=dict)  # prompt tokens whose KV was reused, per prompt

    def as_dict(self) -> dict[str, Any]:
        prompt = sum(self.per_prompt.values())
        return {"prompt_tokens": prompt, "completion_tokens": self.completion_tokens, "total_tokens": prompt + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": sum(self.cached.values())}}


def to_prompt(source: PromptSource) -> Prompt:
    """The HTTP layer's prompt (text, token ids or chat messages) as the backend contract's Prompt."""
    if isinstance(source, str):
        return TextPrompt(source)
    if source and isinstance(source[0], dict):
        return ChatPrompt(tuple(dict(m) for m in cast("Messages", source)))
    return TokenPrompt(tuple(int(i) for i in cast("list[int]", source)))


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class Service:
    def __init__(self, registry: Registry, pool: ModelPool, settings: ServerSettings) -> None:
        self.registry = registry
        self.pool = pool
        self.settings = settings
        self._traits: dict[str, ChatTraits] = {}

    def check_limits(self, model: str, n: int, max_tokens: int | None, stops: Sequence[str]) -> None:
        s = self.settings
        if model not in self.registry.models:
            raise ModelNotFound(model)
        if max_tokens is not None and max_tokens > s.max_tokens_cap:
            raise InvalidRequest(f"max_tokens is {max_tokens}; the limit is {s.max_tokens_cap}.", param="max_tokens")
        if n > s.max_n:
            raise InvalidRequest(f"n is {n}; the limit is {s.max_n}.", param="n")
        if len(stops) > s.max_stop:
            raise InvalidRequest(f"{len(stops)} stop sequences; the limit is {s.max_stop}.", param="stop")

    def check_capabilities(self, plan: Plan) -> None:
        """A field the model's backend cannot honour is a 400 naming it, before any lease."""
        spec = self.registry.models[plan.model]
        caps = capabilities(spec)
        refused = caps.refused(plan.params)
        if any(isinstance(to_prompt(p), TokenPrompt) for p in plan.prompts) and not caps.token_prompts:
            refused.append("prompt")
        if plan.echo and not caps.echo:
            refused.append("echo")
        if refused:
            err = Unsupported(plan.model, refused[0], f"its backend ({spec.backend}) cannot honour it")
            raise InvalidRequest(str(err), param=err.param, code=err.code)

    def generation(self, plan: Plan) -> Generation:
        self.check_capabilities(plan)
        return Generation(self, plan, self.tool_run(plan))

    def traits(self, model: str) -> ChatTraits:
        """The model's chat traits (tool format, thinking), from its GGUF header, once per model."""
        cached = self._traits.get(model)
        if cached is None:
            spec = self.registry.models[model]
            template = None
            try:
                path = model_path(spec, self.registry.base_dir)
                if path is not None:
                    template = read_header(path).metadata.get("tokenizer.chat_template")
            except (OSError, ImportError, ValueError):
                template = None  # the load will fail and say why
            cached = self._traits[model] = chat_traits(template if isinstance(template, str) else None,
                                                       spec.chat_format is not None, spec.reasoning)
        return cached

    def tool_run(self, plan: Plan) -> ToolRun | None:
        """The request's tools resolved for its model (None: the plain path). Fields the model's
        backend cannot honour with tools are a 400 naming them, before any lease."""
        if not plan.chat:
            return None
        messages = cast("Messages", plan.prompts[0])
        run = resolve(plan.tools, messages, self.traits(plan.model))
        if run is None or not run.calls_possible:
            return run
        spec = self.registry.models[plan.model]
        caps = capabilities(spec)
        if not caps.tools:
            raise InvalidRequest(f"model {plan.model!r} cannot take tools: its backend ({spec.backend}) does not run the "
                                 "model here, so the calls could not be constrained", param="tools")
        if not caps.grammar:
            raise InvalidRequest(f"model {plan.model!r} cannot take tools: its backend ({spec.backend}) has no grammar "
                                 "engine to constrain the calls", param="tools")
        if plan.params.grammar is not None:
            raise InvalidRequest("response_format cannot be combined with tools here: the calls have their own grammar",
                                 param="response_format")
        return run


class Generation:
    """One request's run. Use `async with` or call `aclose()`; iterate `events()`."""

    def __init__(self, service: Service, plan: Plan, tool_run: ToolRun | None = None) -> None:
        self.service = service
        self.plan = plan
        self.tool_run = tool_run  # tools, tool history or thinking: how the answer is rendered and read
        self.id = new_id("chatcmpl" if plan.chat else "cmpl")
        self.created = int(time.time())
        self.usage = Usage()
        self._stack = AsyncExitStack()
        self._backend: Backend | None = None
        self._first: tuple[int, PromptSource, TokenStream, GenerationOutcome] | None = None
        self._pushback: TokenEvent | None = None
        self._base_seed = plan.params.seed if plan.params.seed is not None else random.getrandbits(31)
        self.metrics = service.pool.metrics
        self.timer = RequestTimer(self.metrics, plan.model, time.monotonic)

    async def start(self) -> None:
        """Wait for the model, start the first choice and wait for its first event, so every
        error before the first token (queue, load, prompt, prefill) raises here."""
        await self.open()
        assert self._first is not None
        await self._peek(self._first[2])

    async def open(self, on_wait: Callable[[], None] | None = None) -> None:
        """Wait for the model, start the first choice, return once its prompt is accepted
        (tokenized, within the limits and the context), before its prefill runs.

        Refusals decided at once (QueueFull, shutting down) and prompt errors raise here.
        `on_wait` is called before the first wait if the request has to queue for a slot or a
        load; never when a slot is granted at once.
        """
        m = self.metrics
        pool = self.service.pool
        lease = pool.lease(self.plan.model) if on_wait is None else pool.lease(self.plan.model, on_queued=on_wait)
        m.waiting.inc()
        try:
            self._backend = await self._stack.enter_async_context(lease)
        finally:
            m.waiting.dec()
        self.timer.admitted()
        m.running.inc()
        self._stack.callback(self._finished)
        index, prompt = self.plan.choices()[0]
        stream, outcome, accepted = self._launch(index, prompt)
        self._first = (index, prompt, stream, outcome)
        await _accepted(accepted)

    async def _peek(self, stream: TokenStream) -> None:
        """Wait for the first event so errors raise here; push it back for iteration."""
        try:
            first = await stream.__anext__()
        except StopAsyncIteration:
            self._pushback = None
            return
        except BaseException as err:
            raise _api_error(err) from err
        self._pushback = first

    def _launch(self, index: int, prompt: PromptSource) -> tuple[TokenStream, GenerationOutcome, asyncio.Future[None]]:
        """Start one choice in a worker thread. The future resolves when its prompt is accepted:
        every backend checks the context when `generate()` is called and returns the token
        iterator before any prefill, so acceptance costs a tokenization, not a prefill."""
        assert self._backend is not None
        outcome = GenerationOutcome()
        backend = self._backend
        params = replace(self.plan.params, seed=(self._base_seed + index) & 0x7FFFFFFF)
        limits = self.service.settings
        loop = asyncio.get_running_loop()
        accepted: asyncio.Future[None] = loop.create_future()

        run = self.tool_run
        call_limits = CallLimits(limits.max_prompt_tokens, self.plan.max_tokens, limits.max_tokens_cap)

        def prepare(cancel: threading.Event) -> Iterator[TokenEvent]:
            # templating and tokens: the backend's, once
            source = ChatPrompt(tuple(run.messages), run.template_tools) if run else to_prompt(prompt)
            base = replace(params, grammar=run.grammar) if run and run.grammar else params
            lazy = run is not None and run.lazy is not None
            one_trip = None if lazy else getattr(backend, "prepare_generate", None)
            if one_trip is not None:  # a model worker: both steps in one round trip (workers/launch.py)
                return cast("Iterator[TokenEvent]", one_trip(source, base, call_limits, outcome, cancel))
            prepared = backend.prepare(source)
            call = finish_call(prepared, base, backend.n_ctx, call_limits)
            if lazy:
                assert run is not None
                return run_auto(backend, prepared, call, outcome, cancel, run)
            return backend.generate(prepared, call, outcome, cancel)

        def job(cancel: threading.Event) -> Iterator[TokenEvent]:
            # the backend's iterator itself, not a generator around it: a worker's stream relays
            # its tokens to the loop from its reader thread (TokenStream, `relay`)
            try:
                events = prepare(cancel)
            except BaseException as err:
                loop.call_soon_threadsafe(_settle, accepted, err)
                raise
            loop.call_soon_threadsafe(_settle, accepted, None)
            return events

        stream = TokenStream(job, model=self.plan.model)  # a fatal signal in it names the model
        self._stack.push_async_callback(stream.aclose)
        return stream, outcome, accepted

    async def events(self) -> AsyncIterator[Delta | ChoiceEnd]:
        """Every choice's deltas and its end, in order. Call after start() or open()."""
        assert self._first is not None, "call start() or open() first"
        choices = self.plan.choices()
        for k, (index, prompt) in enumerate(choices):
            if k == 0:
                _, _, stream, outcome = self._first
                pending = self._pushback
            else:
                stream, outcome, accepted = self._launch(index, prompt)
                await _accepted(accepted)
                pending = None
            if self.plan.echo:
                yield Delta(index, _prompt_text(prompt, self._backend), echo=True)
            if pending is not None:
                self.timer.token()
                yield Delta(index, pending.text, pending)
            try:
                async for ev in stream:
                    self.timer.token()
                    yield Delta(index, ev.text, ev)
            except BaseException as err:
                raise _api_error(err) from err
            await stream.aclose()
            prompt_key = index // self.plan.n
            self.usage.per_prompt[prompt_key] = outcome.prompt_tokens
            self.usage.cached[prompt_key] = outcome.cached_tokens
            if outcome.cached_tokens:
                self.metrics.prefix_cache_hits.labels(self.plan.model).inc()
                self.metrics.prefix_cache_tokens.labels(self.plan.model).inc(outcome.cached_tokens)
            self.usage.completion_tokens += outcome.completion_tokens
            if k == len(choices) - 1:
                # every choice's stream is closed, its thread out of the backend: the lease goes
                # back now, not after the response's own teardown (the last chunks, [DONE], the
                # SSE task group: ~1-3 ms of the event loop), which a client's next request to the
                # model waited for in its lease (TTFT of back-to-back requests through a worker)
                await self.aclose()
            yield ChoiceEnd(index, outcome.finish_reason)

    def _finished(self) -> None:
        m, model = self.metrics, self.plan.model
        m.running.dec()
        self.timer.finished()
        m.prompt_tokens.labels(model).inc(sum(self.usage.per_prompt.values()))
        m.generation_tokens.labels(model).inc(self.usage.completion_tokens)

    async def aclose(self) -> None:
        """Return the lease (after the streams are closed) and count the request. Idempotent:
        `events()` calls it once the last choice ended, the response again when it is done."""
        await self._stack.aclose()

    async def __aenter__(self) -> Generation:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _settle(fut: asyncio.Future[None], err: BaseException | None) -> None:
    """Resolve `fut` (on the loop) unless its waiter has given up already."""
    if fut.done():
        return
    if err is None:
        fut.set_result(None)
    else:
        fut.set_exception(err)


async def _accepted(fut: asyncio.Future[None]) -> None:
    """Wait for a choice's prompt to be accepted; its refusal as an OpenAI error."""
    try:
        await fut
    except asyncio.CancelledError:
        raise
    except BaseException as err:
        raise _api_error(err) from err


def _prompt_text(prompt: PromptSource, backend: Backend | None) -> str:
    """The completions `echo`: the prompt's text (token prompts detokenized by the model)."""
    p = to_prompt(prompt)
    if isinstance(p, TextPrompt):
        return p.text
    if isinstance(p, TokenPrompt) and backend is not None:
        return backend.detokenize(p.ids)
    return ""


def _api_error(err: BaseException) -> BaseException:
    """Backend exceptions -> OpenAI errors (one table: errors.py)."""
    if isinstance(err, ApiError):
        return err
    if isinstance(err, ContextLengthExceeded):
        return ContextTooLong(str(err))
    if isinstance(err, BackendError):
        return InvalidRequest(str(err), param=err.param, code=err.code)
    if isinstance(err, ValueError):
        return InvalidRequest(str(err))
    return err
