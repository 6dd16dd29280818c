"""Tool calling for one chat request on one model: what to render, what grammar to sample under,
and the two-phase run of `tool_choice: auto`. Knows nothing of HTTP (capibara6/api frames it).

How a request's tools become a generation (`resolve`):

- `none`: no tools in the prompt, no grammar; the answer is text. History with calls and tool
  results is still rendered (the format's `prepare_messages`).
- `required` / a named function (and every tool request on the generic format, whose answer is
  always one JSON object): one phase under the format's *full* grammar, built from the tool
  schemas, so the calls always parse and validate.
- `auto` on a format with a call marker (Hermes / Qwen2.5: `<tool_call>`): the model writes freely
  until it writes the marker; then the first phase is stopped and a second one continues from the
  prompt + everything written so far under the *lazy* grammar (the rest of the call, its closing,
  further calls if `parallel_tool_calls`, then the grammar completes and only end-of-turn is left).
  The second phase's prompt is the first's plus the new text, so the llama.cpp backends reuse the
  whole KV prefix and prefill only the tokens of the text written (a few dozen).

Why two phases instead of a lazy grammar inside the sampler (llama.cpp's `grammar_lazy`)? It
works on every backend that takes a grammar, native included, through the one `generate()` the
contract has; its cost is one short prefill when a call starts.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace
from typing import Any, Iterator, Sequence

from .backends.base import Backend
from .errors import InvalidRequest
from .tools.formats import ToolFormat, Trigger, detect_format
from .tools.reasoning import template_thinks
from .tools.spec import ToolChoice, ToolError, ToolSpec, parse_tool_choice, parse_tools
from .types import GenerationOutcome, Prepared, SamplingParams, TextPrompt, TokenEvent

Messages = list[dict[str, Any]]


@dataclass(frozen=True)
class ToolRequest:
    """A request's tools, validated (pure of any model)."""

    specs: tuple[ToolSpec, ...]
    raw: tuple[dict[str, Any], ...]  # as sent: what a template that renders tools receives
    choice: ToolChoice
    parallel: bool


@dataclass(frozen=True)
class ChatTraits:
    """What a model's chat template does with tools and thinking (read from the GGUF header)."""

    template: str | None  # the GGUF's template when it is the one used; None under a named chat_format
    format: ToolFormat
    thinks: bool


@dataclass(frozen=True)
class ToolRun:
    """One request resolved for one model: the messages to render and the grammars to use."""

    request: ToolRequest | None  # None: no tools asked for (only the history, or thinking)
    format: ToolFormat
    messages: Messages
    template_tools: tuple[dict[str, Any], ...]  # handed to the template (formats that render them)
    grammar: str | None  # the whole answer's grammar (required / named / generic)
    lazy: str | None  # the grammar after `format.marker` (auto on a marker format)
    thinks: bool

    @property
    def calls_possible(self) -> bool:
        return self.request is not None and self.request.choice.mode != "none"


def tool_request(tools: list[dict[str, Any]] | None, choice: Any, parallel: bool) -> ToolRequest | None:
    """The request's `tools` / `tool_choice` / `parallel_tool_calls`, checked; None without tools
    (then `tool_choice` may only be absent, `none` or `auto`: the Responses API's default is
    `auto`, and it asks for nothing without tools)."""
    if not tools and choice in (None, "none", "auto"):
        return None
    try:
        specs = parse_tools(tools) if tools else ()
        parsed = parse_tool_choice(choice, specs)
    except ToolError as err:
        raise InvalidRequest(str(err), param=err.param) from None
    if not specs:
        return None
    return ToolRequest(specs, tuple(tools or ()), parsed, parallel)


def has_tool_history(messages: Sequence[dict[str, Any]]) -> bool:
    return any(m.get("tool_calls") or m.get("role") == "tool" for m in messages)


def resolve(req: ToolRequest | None, messages: Messages, traits: ChatTraits) -> ToolRun | None:
    """The run for this model; None when neither tools, tool history nor thinking are involved
    (the plain path, untouched). Raises InvalidRequest naming the field."""
    if req is None and not has_tool_history(messages) and not traits.thinks:
        return None
    fmt = traits.format
    specs = req.specs if req is not None else ()
    try:
        prepared = fmt.prepare_messages(messages, specs if req is not None and req.choice.mode != "none" else ())
    except ToolError as err:
        raise InvalidRequest(str(err), param=err.param) from None
    shown = req.raw if req is not None and traits.template is not None and fmt.marker else ()
    if req is None or req.choice.mode == "none":
        # the tools stay in the prompt (as OpenAI keeps them in context); nothing is constrained or read as a call
        return ToolRun(req, fmt, prepared, shown, None, None, traits.thinks)
    try:
        if req.choice.mode == "auto" and fmt.marker:
            grammar, lazy = None, fmt.lazy_grammar(specs, req.parallel)
        else:
            grammar, lazy = fmt.full_grammar(specs, req.choice, req.parallel), None
    except ToolError as err:
        raise InvalidRequest(str(err), param=err.param) from None
    return ToolRun(req, fmt, prepared, shown, grammar, lazy, traits.thinks)


def chat_traits(template: str | None, named_format: bool, reasoning: str) -> ChatTraits:
    """Traits from the GGUF's template (None when it has none). A named `chat_format` (e.g. our
    `gemma`) renders no tools: such a model gets the generic JSON format. `reasoning`: the
    registry's override, `auto` (from the template), `think` or `none`."""
    used = None if named_format else template
    thinks = template_thinks(used) if reasoning == "auto" else reasoning == "think"
    return ChatTraits(used, detect_format(used), thinks)


# -- the two-phase run of `auto` ------------------------------------------------------------------


class LinkedCancel(threading.Event):
    """A cancel event that is also set when its parent is: phase one of `auto` is stopped at the
    call marker without cancelling the request. `wait` polls the parent every 10 ms."""

    def __init__(self, parent: threading.Event) -> None:
        super().__init__()
        self._parent = parent

    def is_set(self) -> bool:
        return super().is_set() or self._parent.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        step = 0.01
        waited = 0.0
        while not self.is_set():
            if timeout is not None and waited >= timeout:
                return False
            super().wait(step if timeout is None else min(step, timeout - waited))
            waited += step
        return True


def run_auto(backend: Backend, prepared: Prepared, params: SamplingParams, outcome: GenerationOutcome,
             cancel: threading.Event, run: ToolRun) -> Iterator[TokenEvent]:
    """Phase one free until the format's trigger, then phase two under the lazy grammar from
    prompt + text so far.

    The trigger is the call marker anywhere, or at the answer's start a JSON object (bare or in a
    ```json fence) whose `"name"` is one of the tools: Qwen2.5-Coder-0.5B answered "weather in
    Paris?" with a fenced object and no marker (`{"name": "reverse_string"}`, naming no tool,
    stays text). Invariants: the text yielded is exactly phase one's up to the trigger's end, then phase
    two's; `outcome` counts the prompt once (phase one's) and the completion tokens of both;
    `max_tokens` bounds both phases together; the request's cancel stops either phase."""
    assert run.request is not None
    fmt, specs = run.format, run.request.specs
    first = GenerationOutcome()
    phase_cancel = LinkedCancel(cancel)
    seen = ""
    trig: Trigger | None = None
    events = backend.generate(prepared, params, first, phase_cancel)
    for ev in events:
        before = len(seen)
        seen += ev.text
        trig = fmt.trigger(seen, specs) if ev.text else None
        _copy(first, outcome)
        if trig is None:
            yield ev
            continue
        yield replace(ev, text=ev.text[: max(0, trig.end - before)])
        phase_cancel.set()
        for _ in events:  # the phase ends within a token; what it adds past the trigger is dropped
            pass
        break
    _copy(first, outcome)
    if trig is None or cancel.is_set():
        return
    left = params.max_tokens - first.completion_tokens
    if left <= 0:
        outcome.finish_reason = "length"
        return
    lazy = run.lazy if trig.kind == "marker" and run.lazy else fmt.lazy_grammar(specs, run.request.parallel, after=trig)
    assert prepared.text is not None, "a chat prompt always has its templated text"
    cont = backend.prepare(TextPrompt(prepared.text + seen[: trig.end]))
    second = GenerationOutcome()
    # no stop strings inside a call: the grammar ends it, and a user's stop must not cut its JSON
    call_params = replace(params, grammar=lazy, max_tokens=left, stop=())
    for ev in backend.generate(cont, call_params, second, cancel):
        outcome.completion_tokens = first.completion_tokens + second.completion_tokens
        yield ev
    outcome.completion_tokens = first.completion_tokens + second.completion_tokens
    outcome.finish_reason = second.finish_reason


def _copy(src: GenerationOutcome, dst: GenerationOutcome) -> None:
    dst.prompt_tokens, dst.completion_tokens = src.prompt_tokens, src.completion_tokens
    dst.finish_reason, dst.cached_tokens = src.finish_reason, src.cached_tokens
