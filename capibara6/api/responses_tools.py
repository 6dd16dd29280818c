"""Function tools on the Responses API: the request's shapes to chat's, and calls back as items.

The Responses API spells tools flat (`{"type": "function", "name", "parameters"}`), a forced
choice as `{"type": "function", "name"}`, a call as an output item `function_call` (`call_id`,
`name`, `arguments`) and its result as an input item `function_call_output` (`call_id`,
`output`). Here they become chat's tools, tool_calls and `tool` messages, so one path
(capibara6/tool_use.py: grammars, two-phase auto, parsing) serves both APIs. A stream with tools
sends OpenAI's item events: a `message` item opened at the first text, and per call
`response.output_item.added` (arguments ""), `response.function_call_arguments.delta` per
fragment, `response.function_call_arguments.done`, `response.output_item.done`.
"""

from __future__ import annotations

import uuid
from typing import Any, AsyncIterator, Callable

from ..errors import InvalidRequest
from ..serving import ChoiceEnd, Generation
from .answers import Shaper, finish_reason, message

Item = dict[str, Any]
Event = Callable[..., bytes]  # Frames.event(kind, **fields)


def chat_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """Responses function tools as chat tools; a built-in tool type is a 400 naming it."""
    if not tools:
        return None
    out = []
    for i, tool in enumerate(tools):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind != "function":
            raise InvalidRequest(f"tools[{i}]: tool type {kind!r} is not supported here (function tools only: no built-in "
                                 "web search, file search, computer or code tools run here).", param="tools")
        fn = {k: tool[k] for k in ("name", "description", "parameters", "strict") if tool.get(k) is not None}
        out.append({"type": "function", "function": fn})
    return out


def chat_tool_choice(choice: Any) -> Any:
    """`{"type": "function", "name": f}` as chat's `{"type": "function", "function": {"name": f}}`."""
    if isinstance(choice, dict) and choice.get("type") == "function" and "name" in choice:
        return {"type": "function", "function": {"name": choice["name"]}}
    return choice


def item_message(item: dict[str, Any], messages: list[dict[str, Any]], where: str) -> None:
    """Append a `function_call` (to the assistant turn before it, or a new one) or a
    `function_call_output` (a `tool` message) to `messages`."""
    kind = item.get("type")
    call_id = item.get("call_id")
    if not isinstance(call_id, str) or not call_id:
        raise InvalidRequest(f"{where}: a {kind} item needs a string call_id.", param="input")
    if kind == "function_call":
        name, arguments = item.get("name"), item.get("arguments")
        if not isinstance(name, str) or not isinstance(arguments, str):
            raise InvalidRequest(f"{where}: a function_call item needs a string name and string arguments.", param="input")
        call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
        last = messages[-1] if messages else None
        if last is not None and last["role"] == "assistant" and last.get("tool_calls") is not None:
            last["tool_calls"].append(call)
        else:
            messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        return
    output = item.get("output")
    if not isinstance(output, str):
        raise InvalidRequest(f"{where}: a function_call_output item needs a string output.", param="input")
    messages.append({"role": "tool", "tool_call_id": call_id, "content": output})


def call_item(call: dict[str, Any], status: str = "completed") -> Item:
    fn = call["function"]
    return {"id": "fc_" + uuid.uuid4().hex, "type": "function_call", "status": status, "call_id": call["id"],
            "name": fn["name"], "arguments": fn["arguments"]}


def output_items(text: str, gen: Generation, message_item: Callable[[str, str], Item]) -> tuple[list[Item], dict[str, Any]]:
    """(the output items, the assistant message to store) of a whole answer with tools."""
    msg = message(text, gen.tool_run)
    items = [message_item(msg["content"], "completed")] if msg.get("content") else []
    items += [call_item(c) for c in msg.get("tool_calls") or ()]
    stored = {"role": "assistant", "content": msg.get("content") or ""}
    if msg.get("tool_calls"):
        stored["tool_calls"] = msg["tool_calls"]
    return items, stored


class ItemStream:
    """The output items of a streamed answer with tools, as OpenAI's events."""

    def __init__(self, event: Event, message_id: str, message_item: Callable[[str, str], Item]) -> None:
        self.event = event
        self.message_id = message_id
        self.message_item = message_item
        self.items: list[Item] = []
        self.text: str | None = None  # the message item's text, once it is open
        self.calls: dict[int, tuple[int, Item]] = {}  # call index -> (output index, item)
        self.finish: str | None = None

    def _text(self, delta: str) -> list[bytes]:
        out = []
        where = {"output_index": 0, "content_index": 0}
        if self.text is None:
            self.text = ""
            where["output_index"] = len(self.items)
            self.items.append(self.message_item("", "in_progress"))
            out.append(self.event("response.output_item.added", output_index=where["output_index"], item=self.items[-1]))
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            out.append(self.event("response.content_part.added", item_id=self.message_id, **where, part=part))
        self.text += delta
        where["output_index"] = next(i for i, it in enumerate(self.items) if it["type"] == "message")
        out.append(self.event("response.output_text.delta", item_id=self.message_id, **where, delta=delta, logprobs=[]))
        return out

    def _call(self, tc: dict[str, Any]) -> list[bytes]:
        index = tc["index"]
        if index not in self.calls:
            item = call_item({"id": tc["id"], "function": {"name": tc["function"]["name"], "arguments": ""}}, "in_progress")
            self.calls[index] = (len(self.items), item)
            self.items.append(item)
            return [self.event("response.output_item.added", output_index=len(self.items) - 1, item=item)]
        at, item = self.calls[index]
        fragment = tc["function"].get("arguments", "")
        item["arguments"] += fragment
        return [self.event("response.function_call_arguments.delta", item_id=item["id"], output_index=at, delta=fragment)]

    def feed(self, deltas: list[dict[str, Any]]) -> list[bytes]:
        out: list[bytes] = []
        for d in deltas:
            if d.get("content"):
                out += self._text(d["content"])
            for tc in d.get("tool_calls") or ():
                out += self._call(tc)
        return out

    def close(self) -> list[bytes]:
        """Every open item done, in output order."""
        out: list[bytes] = []
        for at, item in enumerate(self.items):
            if item["type"] == "message":
                text = self.text or ""
                where = {"output_index": at, "content_index": 0}
                out.append(self.event("response.output_text.done", item_id=self.message_id, **where, text=text, logprobs=[]))
                part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
                out.append(self.event("response.content_part.done", item_id=self.message_id, **where, part=part))
                self.items[at] = self.message_item(text, "completed")
            else:
                out.append(self.event("response.function_call_arguments.done", item_id=item["id"], output_index=at,
                                      name=item["name"], arguments=item["arguments"]))
                item["status"] = "completed"
            out.append(self.event("response.output_item.done", output_index=at, item=self.items[at]))
        return out

    def stored(self) -> dict[str, Any]:
        msg: dict[str, Any] = {"role": "assistant", "content": self.text or ""}
        calls = [it for it in self.items if it["type"] == "function_call"]
        if calls:
            msg["tool_calls"] = [{"id": c["call_id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
                                 for c in calls]
        return msg


async def stream_items(gen: Generation, items: ItemStream) -> AsyncIterator[bytes]:
    """The item events of `gen`, every item closed at the end; its finish reason in `items.finish`."""
    shaper = Shaper(gen.tool_run)
    async for ev in gen.events():
        if isinstance(ev, ChoiceEnd):
            items.finish = finish_reason(ev.finish_reason, shaper.calls)
            for frame in items.feed(shaper.finish()):
                yield frame
        elif ev.text:
            for frame in items.feed(shaper.feed(ev.text)):
                yield frame
    for frame in items.close():
        yield frame
