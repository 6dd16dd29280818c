"""A chat history with tool calls and tool results, checked and put in the shape templates expect.

OpenAI sends an assistant call's `function.arguments` as JSON *text*; the GGUF templates (Qwen2.5's
`tool_call.arguments | tojson`, HF transformers) expect the decoded object, else the arguments
would be rendered as a quoted string. A `tool` message must answer the id of a call made by an
earlier assistant turn (OpenAI refuses the request otherwise); it gets that call's `name`, which
some templates show.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

from .spec import ToolError

Message = dict[str, Any]


def normalize_history(messages: Sequence[Message]) -> list[Message]:
    """The messages with every assistant call's arguments decoded (a JSON object) and every tool
    result tied to its call. The input is not changed. ToolError names the field at fault."""
    out: list[Message] = []
    calls: dict[str, str] = {}  # call id -> function name, from earlier assistant turns
    for i, msg in enumerate(messages):
        role = msg.get("role")
        if role == "assistant" and msg.get("tool_calls"):
            fixed = [_call(tc, f"messages[{i}].tool_calls[{j}]") for j, tc in enumerate(msg["tool_calls"])]
            calls.update((tc["id"], tc["function"]["name"]) for tc in fixed)
            out.append({**msg, "tool_calls": fixed})
        elif role == "tool":
            call_id = msg.get("tool_call_id")
            if not isinstance(call_id, str) or call_id not in calls:
                raise ToolError(
                    f"'messages[{i}].tool_call_id' ({call_id!r}) does not answer a tool call of an earlier assistant message", f"messages[{i}].tool_call_id"
                )
            out.append({**msg, "name": calls[call_id]})
        else:
            out.append(dict(msg))
    return out


def _call(tc: Any, where: str) -> Message:
    if not isinstance(tc, dict):
        raise ToolError(f"'{where}' must be an object", where)
    if tc.get("type", "function") != "function":
        raise ToolError(f"'{where}.type' must be 'function'", f"{where}.type")
    call_id = tc.get("id")
    if not isinstance(call_id, str) or not call_id:
        raise ToolError(f"'{where}.id' must be a non-empty string", f"{where}.id")
    fn = tc.get("function")
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise ToolError(f"'{where}.function' must be an object with a string 'name'", f"{where}.function")
    args = fn.get("arguments", "{}")
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as err:
            raise ToolError(f"'{where}.function.arguments' is not valid JSON: {err.msg}", f"{where}.function.arguments") from None
    if not isinstance(args, dict):
        raise ToolError(f"'{where}.function.arguments' must be a JSON object", f"{where}.function.arguments")
    return {"id": call_id, "type": "function", "function": {"name": fn["name"], "arguments": args}}


def text_of(content: Any) -> str:
    """A message's content as text (a string, text parts, or None)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content if isinstance(p, dict))
