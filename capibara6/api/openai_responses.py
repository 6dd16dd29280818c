"""OpenAI's Responses API on the chat path: `POST /v1/responses`, `GET` / `DELETE /v1/responses/{id}`.

A Responses request becomes a chat `Plan` (one choice): `instructions` is a system message first,
then the stored conversation of `previous_response_id` (its input and output; not its
instructions, as OpenAI does), then `input`. `text.format` goes through the same grammar path as
chat's `response_format`. The answer is one assistant `message` item of `output_text`. With
`store` (default true) the response and its conversation go into the process's bounded store
(capibara6/api/response_store.py).

The stream is OpenAI's named events, each `event: <type>\\ndata: {...}` with a `sequence_number`:

    response.created, response.in_progress, response.output_item.added, response.content_part.added,
    response.output_text.delta (one per token piece)*, response.output_text.done,
    response.content_part.done, response.output_item.done, response.completed | response.incomplete

An error once the headers are out is one `event: error` (whose data also carries `error`, so the
SDK raises it as an `APIError`), and the stream ends. There is no `data: [DONE]` in this API.

The field rule is chat's (capibara6/api/protocol.py) with this API's own tables below. Function
tools, `function_call` / `function_call_output` input items and `function_call` output items go
through chat's tool path (capibara6/api/responses_tools.py); built-in tools are a 400 naming them.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any, AsyncIterator, Literal, Union

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from ..errors import ApiError, InvalidRequest, NotFound
from ..serving import ChoiceEnd, Generation, Plan, Usage
from ..tool_use import tool_request
from ..types import SamplingParams
from .answers import finish_reason
from .grammar import response_format_grammar
from .protocol import JsonSchemaFormat, Refusal, ResponseFormat, _apply_rule, _is
from .requests import stream_default
from .response_store import ResponseStore
from .responses import counted, open_generation, until_disconnect
from .responses_tools import ItemStream, chat_tool_choice, chat_tools, item_message, output_items, stream_items
from .state import AppState, app_role, app_state
from .streaming import EventStream

router = APIRouter()
log = logging.getLogger("capibara6.api")

Messages = list[dict[str, Any]]

# -- the field table (ResponseCreateParams in openai-python 3.57) --------------------------------

# Accepted with any value and dropped: none changes what is generated.
NO_EFFECT: dict[str, str] = {
    "user": "an end-user id for OpenAI's abuse monitoring",
    "safety_identifier": "an end-user id for OpenAI's abuse monitoring",
    "service_tier": "OpenAI's processing tier (price and latency, not the text)",
    "prompt_cache_key": "a prompt-cache routing hint; our prefix cache needs none",
    "prompt_cache_retention": "how long OpenAI keeps cached prefixes",
    "prompt_cache_options": "OpenAI's cache breakpoints and their lifetime",
    "max_tool_calls": "a cap on calls to built-in tools; none run here (function calls are the client's to run)",
}

UNSUPPORTED: dict[str, Refusal] = {
    "background": Refusal("responses are not run in the background; omit background or send false.", _is(False)),
    "background_options": Refusal("responses are not run in the background; omit background_options."),
    "conversation": Refusal("there is no Conversations API here; use previous_response_id."),
    "context_management": Refusal("no server-side context compaction; omit context_management."),
    "include": Refusal("no extra output data (logprobs, sources, encrypted reasoning); omit include or send [].", _is([])),
    "prompt": Refusal("there are no stored prompt templates here; send input and instructions."),
    "reasoning": Refusal("the served models have no reasoning mode; omit reasoning.", _is({}, {"effort": "none"})),
    "top_logprobs": Refusal("no logprobs on this endpoint yet; omit top_logprobs or send 0.", _is(0)),
    "truncation": Refusal("input is never truncated; omit truncation or send 'disabled'.", _is("disabled")),
    "moderation": Refusal("no moderation model runs, so nothing would be scored or blocked; omit moderation."),
    "image": Refusal("output is text only; omit image."),
    "access_programs": Refusal("no access programs here; omit access_programs."),
}


def _refuse(param: str, message: str) -> PydanticCustomError:
    # `param` in ctx: the HTTP layer puts it in the error's `param` (api/app.py)
    return PydanticCustomError("unsupported_field", "{message}", {"param": param, "message": message})


class TextFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None
    description: str | None = None  # tells a model what the format is for; the grammar enforces it either way

    def echo(self) -> dict[str, Any]:
        """As the Response object repeats it."""
        if self.type != "json_schema":
            return {"type": self.type}
        return {"type": "json_schema", "name": self.name or "response", "schema": self.schema_ or {},
                "strict": self.strict, "description": self.description}


class TextConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: TextFormat = Field(default_factory=TextFormat)
    verbosity: str | None = None

    @model_validator(mode="after")
    def _medium_only(self) -> TextConfig:
        if self.verbosity not in (None, "medium"):
            raise _refuse("text", "Unsupported parameter: 'text.verbosity' is not supported here: no verbosity control; "
                                  "omit it or send 'medium' (the default).")
        return self


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_obfuscation: bool | None = None  # no effect: our events carry no obfuscation padding


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    input: Union[str, list[dict[str, Any]]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    text: TextConfig = Field(default_factory=TextConfig)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    store: bool = True
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None  # kept with the response and repeated in it
    tools: list[dict[str, Any]] | None = None  # function tools (capibara6/api/responses_tools.py)
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True

    @model_validator(mode="before")
    @classmethod
    def _one_rule(cls, data: Any) -> Any:
        return _apply_rule(data, UNSUPPORTED, NO_EFFECT)


# -- input items -> chat messages ----------------------------------------------------------------

ROLES = ("user", "assistant", "system", "developer")
TEXT_PARTS = ("input_text", "output_text")
TOOL_ITEMS = ("function_call", "function_call_output")
CUSTOM_TOOL_ITEMS = ("custom_tool_call", "custom_tool_call_output")


def _part_text(part: Any, where: str) -> str:
    if isinstance(part, str):
        return part
    kind = part.get("type") if isinstance(part, dict) else None
    if kind in TEXT_PARTS and isinstance(part.get("text"), str):
        return str(part["text"])
    if kind in TEXT_PARTS:
        raise InvalidRequest(f"{where}: an {kind} part needs a string 'text'.", param="input")
    raise InvalidRequest(f"{where}: content part type {kind!r} is not supported (text only: input_text, output_text).", param="input")


def input_messages(input_: str | list[dict[str, Any]]) -> Messages:
    """`input` as chat messages; an item or part this server cannot honour is a 400 naming its type."""
    if isinstance(input_, str):
        return [{"role": "user", "content": input_}]
    messages: Messages = []
    for i, item in enumerate(input_):
        where = f"input[{i}]"
        kind = item.get("type", "message")
        if kind in TOOL_ITEMS:
            item_message(item, messages, where)
            continue
        if kind in CUSTOM_TOOL_ITEMS:
            raise InvalidRequest(f"{where}: input item type {kind!r} is not supported (custom tools: send function tools).", param="input")
        if kind != "message":
            raise InvalidRequest(f"{where}: input item type {kind!r} is not supported (messages only).", param="input")
        role = item.get("role")
        if role not in ROLES:
            raise InvalidRequest(f"{where}: role must be one of {', '.join(ROLES)}, not {role!r}.", param="input")
        content = item.get("content")
        if isinstance(content, str):
            text = content
        elif isinstance(content, list):
            text = "".join(_part_text(p, where) for p in content)
        else:
            raise InvalidRequest(f"{where}: content must be a string or a list of text parts.", param="input")
        messages.append({"role": role, "content": text})
    if not any(m["role"] in ("user", "assistant", "tool") for m in messages):
        raise InvalidRequest("input has no user or assistant message.", param="input")
    return messages


# -- the plan --------------------------------------------------------------------------------------


def grammar(fmt: TextFormat) -> str | None:
    """`text.format` through chat's response_format -> GBNF path."""
    if fmt.type == "json_schema" and not fmt.schema_:
        raise InvalidRequest("text.format json_schema needs a schema.", param="text")
    schema = JsonSchemaFormat.model_validate({"name": fmt.name or "response", "schema": fmt.schema_ or {}, "strict": fmt.strict})
    try:
        return response_format_grammar(ResponseFormat(type=fmt.type, json_schema=schema if fmt.type == "json_schema" else None))
    except InvalidRequest as err:
        raise InvalidRequest(err.message.replace("response_format", "text.format"), param="text") from None


def responses_store(state: AppState) -> ResponseStore:
    """The process's one store (every port shares it), made on first use from the settings. Kept
    in the AppState's own namespace: the state is one object per process, made by the server."""
    store = state.__dict__.get("responses_store")
    if store is None:
        s = state.settings
        store = state.__dict__.setdefault(
            "responses_store", ResponseStore(s.responses_store_max, s.responses_store_max_bytes, s.responses_store_ttl_s)
        )
    assert isinstance(store, ResponseStore)
    return store


def _not_found(response_id: str, param: str | None = None) -> NotFound:
    return NotFound(f"Response with id '{response_id}' not found.", param=param, code="response_not_found")


def conversation(state: AppState, req: ResponsesRequest) -> tuple[Messages, Messages]:
    """(the prompt's messages, the history to store): instructions, earlier turns, this input."""
    history: Messages = []
    if req.previous_response_id is not None:
        entry = responses_store(state).get(req.previous_response_id)
        if entry is None:
            raise _not_found(req.previous_response_id, "previous_response_id")
        history = list(entry.history)
    history += input_messages(req.input)
    system = [{"role": "system", "content": req.instructions}] if req.instructions else []
    return system + history, history


def responses_plan(state: AppState, req: ResponsesRequest, messages: Messages) -> Plan:
    s = state.settings
    if req.model not in state.registry.models:
        if req.model in state.registry.ensembles:
            raise InvalidRequest(f"'{req.model}' is an ensemble; /v1/responses serves one model.", param="model")
        state.service.check_limits(req.model, 1, None, ())  # ModelNotFound: 404 as chat answers
    if req.max_output_tokens is not None and req.max_output_tokens > s.max_tokens_cap:
        raise InvalidRequest(f"max_output_tokens is {req.max_output_tokens}; the limit is {s.max_tokens_cap}.", param="max_output_tokens")
    params = SamplingParams(temperature=req.temperature, top_p=req.top_p, grammar=grammar(req.text.format))
    tools = tool_request(chat_tools(req.tools), chat_tool_choice(req.tool_choice), req.parallel_tool_calls)
    return Plan(req.model, True, [messages], 1, req.max_output_tokens, params, tools=tools)


# -- Response objects ------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def usage_object(usage: Usage) -> dict[str, Any]:
    u = usage.as_dict()
    return {
        "input_tokens": u["prompt_tokens"],
        "input_tokens_details": {"cached_tokens": u["prompt_tokens_details"]["cached_tokens"]},
        "output_tokens": u["completion_tokens"],
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": u["total_tokens"],
    }


def message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}] if status != "in_progress" else []
    return {"id": item_id, "type": "message", "role": "assistant", "status": status, "content": content}


class Run:
    """One Responses request's identity and the Response objects it goes through."""

    def __init__(self, req: ResponsesRequest) -> None:
        self.req = req
        self.id = new_id("resp")
        self.item_id = new_id("msg")
        self.created_at = int(time.time())

    def response(self, status: str, output: list[dict[str, Any]], usage: dict[str, Any] | None) -> dict[str, Any]:
        req = self.req
        incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
        return {
            "id": self.id, "object": "response", "created_at": self.created_at, "status": status,
            "completed_at": int(time.time()) if status == "completed" else None,
            "background": False, "error": None, "incomplete_details": incomplete,
            "instructions": req.instructions, "max_output_tokens": req.max_output_tokens, "max_tool_calls": None,
            "model": req.model, "output": output, "parallel_tool_calls": req.parallel_tool_calls,
            "previous_response_id": req.previous_response_id, "reasoning": {"effort": None, "summary": None},
            "service_tier": "default", "store": req.store, "temperature": req.temperature,
            "text": {"format": req.text.format.echo(), "verbosity": "medium"}, "tool_choice": req.tool_choice or "auto",
            "tools": req.tools or [],
            "top_logprobs": 0, "top_p": req.top_p, "truncation": "disabled", "usage": usage,
            "user": None, "metadata": req.metadata or {},
        }

    def final(self, text: str, finish: str | None, usage: Usage, output: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        status = "incomplete" if finish == "length" else "completed"
        items = output if output is not None else [message_item(self.item_id, text, status)]
        return self.response(status, items, usage_object(usage))

    def message(self, text: str, status: str) -> dict[str, Any]:
        return message_item(self.item_id, text, status)


def keep(state: AppState, run: Run, response: dict[str, Any], history: Messages, said: dict[str, Any]) -> None:
    """Store the response and its conversation; `said` is the assistant turn (text, calls)."""
    if run.req.store and not responses_store(state).put(response, [*history, said]):
        log.warning("responses: %s is over --responses-store-max-bytes on its own; not stored", run.id)


# -- the stream --------------------------------------------------------------------------------------


class Frames:
    """Named SSE events, numbered in order (`sequence_number` from 0)."""

    def __init__(self) -> None:
        self.seq = 0

    def event(self, kind: str, **fields: Any) -> bytes:
        obj = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        data = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
        return f"event: {kind}\ndata: {data}\n\n".encode()

    def error(self, err: ApiError) -> bytes:
        body = err.body()["error"]
        return self.event("error", code=err.code, message=err.message, param=err.param, error=body)


async def stream_events(state: AppState, run: Run, gen: Generation, history: Messages, frames: Frames) -> AsyncIterator[bytes]:
    item, where = run.item_id, {"output_index": 0, "content_index": 0}
    started = run.response("in_progress", [], None)
    yield frames.event("response.created", response=started)
    yield frames.event("response.in_progress", response=started)
    if gen.tool_run is not None and gen.tool_run.calls_possible:
        items = ItemStream(frames.event, item, run.message)
        async for frame in stream_items(gen, items):
            yield frame
        done = run.final("", items.finish, gen.usage, items.items)
        keep(state, run, done, history, items.stored())
        yield frames.event("response.completed" if done["status"] == "completed" else "response.incomplete", response=done)
        return
    yield frames.event("response.output_item.added", output_index=0, item=message_item(item, "", "in_progress"))
    part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
    yield frames.event("response.content_part.added", item_id=item, **where, part=part)
    pieces: list[str] = []
    finish: str | None = None
    async for ev in gen.events():
        if isinstance(ev, ChoiceEnd):
            finish = ev.finish_reason
        elif ev.text:  # an empty piece is a held-back possible stop string
            pieces.append(ev.text)
            yield frames.event("response.output_text.delta", item_id=item, **where, delta=ev.text, logprobs=[])
    text = "".join(pieces)
    yield frames.event("response.output_text.done", item_id=item, **where, text=text, logprobs=[])
    yield frames.event("response.content_part.done", item_id=item, **where, part={**part, "text": text})
    final = run.final(text, finish, gen.usage)
    yield frames.event("response.output_item.done", output_index=0, item=final["output"][0])
    keep(state, run, final, history, {"role": "assistant", "content": text})
    yield frames.event("response.completed" if final["status"] == "completed" else "response.incomplete", response=final)


async def open_stream(state: AppState, run: Run, gen: Generation, history: Messages) -> Response:
    """The Responses event stream of `gen`; its headers go out as chat's do (open_generation)."""
    opening = await open_generation(gen)
    frames = Frames()
    return EventStream(opening, stream_events(state, run, gen, history, frames), gen.aclose, state.settings.sse_ping_s, frames.error)


# -- routes ------------------------------------------------------------------------------------------


@router.post("/v1/responses")
async def create_response(req: ResponsesRequest, request: Request) -> Response:
    """Counted in capibara6_requests_total{endpoint="responses"} like every completion request."""
    return await counted(request, req.model, _create(req, request))


async def _create(req: ResponsesRequest, request: Request) -> Response:
    state = app_state(request)
    stream = req.stream if req.stream is not None else stream_default(app_role(request))
    if req.stream_options is not None and not stream:
        raise InvalidRequest("The 'stream_options' parameter is only allowed when 'stream' is true.", param="stream_options")
    messages, history = conversation(state, req)
    plan = responses_plan(state, req, messages)
    try:
        gen = state.service.generation(plan)
    except InvalidRequest as err:
        if err.param and err.param.startswith("messages"):  # the tool history is this API's `input`
            raise InvalidRequest(err.message, param="input", code=err.code) from None
        raise
    run = Run(req)
    if stream:
        return await open_stream(state, run, gen, history)

    async def complete() -> dict[str, Any]:
        async with gen:
            await gen.start()
            pieces: list[str] = []
            finish: str | None = None
            async for ev in gen.events():
                if isinstance(ev, ChoiceEnd):
                    finish = ev.finish_reason
                else:
                    pieces.append(ev.text)
        text = "".join(pieces)
        if gen.tool_run is not None and gen.tool_run.calls_possible:
            output, said = output_items(text, gen, run.message)
            final = run.final(text, finish_reason(finish, len(said.get("tool_calls") or ())), gen.usage, output)
        else:
            final, said = run.final(text, finish, gen.usage), {"role": "assistant", "content": text}
        keep(state, run, final, history, said)
        return final

    return JSONResponse(await until_disconnect(request, complete()))


@router.get("/v1/responses/{response_id}")
async def get_response(response_id: str, request: Request) -> dict[str, Any]:
    entry = responses_store(app_state(request)).get(response_id)
    if entry is None:
        raise _not_found(response_id)
    return entry.response


@router.delete("/v1/responses/{response_id}")
async def delete_response(response_id: str, request: Request) -> dict[str, Any]:
    if not responses_store(app_state(request)).delete(response_id):
        raise _not_found(response_id)
    return {"id": response_id, "object": "response.deleted", "deleted": True}


__all__ = ["ResponsesRequest", "input_messages", "router"]
