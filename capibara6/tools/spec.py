"""A request's `tools` and `tool_choice`, checked: what the rest of capibara6/tools works from.

Pure data and validation, no model and no HTTP. Every refusal is a ToolError whose `param` is the
request field a 400 names (OpenAI's `invalid_request_error` shape), e.g.
`tools[1].function.parameters` or `tool_choice`.
"""

from __future__ import annotations

import re
import secrets
import string
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Sequence

import jsonschema

NAME_RE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")  # OpenAI's rule for function names
EMPTY_PARAMETERS: Mapping[str, Any] = {"type": "object", "properties": {}}
_ID_ALPHABET = string.ascii_letters + string.digits

Mode = Literal["none", "auto", "required", "named"]


class ToolError(ValueError):
    """A tool field the request got wrong; `param` names it (the 400's `param`)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ToolSpec:
    """One function the model may call. `parameters` is a JSON Schema object (checked against
    Draft 2020-12's meta-schema); `strict` is recorded as sent: every call is generated under the
    schema's grammar either way, so strict and non-strict calls are held to the same rule."""

    name: str
    description: str
    parameters: Mapping[str, Any]
    strict: bool


@dataclass(frozen=True)
class ToolChoice:
    """`tool_choice`, resolved: `name` is set exactly when `mode` is "named"."""

    mode: Mode
    name: str | None = None


@dataclass(frozen=True)
class ToolCall:
    """One call the model made: `arguments` is JSON text (OpenAI's `function.arguments`)."""

    id: str
    name: str
    arguments: str


def new_call_id() -> str:
    """OpenAI's shape: "call_" + 24 random letters and digits."""
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


def parse_tools(raw: list[dict[str, Any]]) -> tuple[ToolSpec, ...]:
    """OpenAI's `tools` list -> specs. Only `type: "function"`; names match ^[a-zA-Z0-9_-]{1,64}$
    and are unique; `parameters` defaults to an empty object schema and must itself be a valid
    Draft 2020-12 schema of type object. Whether it compiles to a grammar is checked later, by
    the format (capibara6/tools/schema_grammar.py), which names the same field."""
    if not isinstance(raw, list):
        raise ToolError("'tools' must be a list of tool objects", "tools")
    specs: list[ToolSpec] = []
    seen: set[str] = set()
    for i, tool in enumerate(raw):
        spec = _parse_tool(tool, f"tools[{i}]")
        if spec.name in seen:
            raise ToolError(f"tool name {spec.name!r} is used twice: names must be unique", f"tools[{i}].function.name")
        seen.add(spec.name)
        specs.append(spec)
    return tuple(specs)


def _parse_tool(tool: Any, where: str) -> ToolSpec:
    if not isinstance(tool, dict):
        raise ToolError(f"'{where}' must be an object", where)
    if tool.get("type") != "function":
        raise ToolError(f"'{where}.type' must be 'function' (got {tool.get('type')!r}): only function tools are supported", f"{where}.type")
    fn = tool.get("function")
    if not isinstance(fn, dict):
        raise ToolError(f"'{where}.function' must be an object", f"{where}.function")
    name = fn.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ToolError(f"'{where}.function.name' must match ^[a-zA-Z0-9_-]{{1,64}}$ (got {name!r})", f"{where}.function.name")
    description = fn.get("description") or ""
    if not isinstance(description, str):
        raise ToolError(f"'{where}.function.description' must be a string", f"{where}.function.description")
    strict = fn.get("strict") or False
    if not isinstance(strict, bool):
        raise ToolError(f"'{where}.function.strict' must be a boolean", f"{where}.function.strict")
    parameters = fn.get("parameters")
    parameters = EMPTY_PARAMETERS if parameters is None else parameters
    _check_parameters(parameters, f"{where}.function.parameters")
    return ToolSpec(name, description, parameters, strict)


def _check_parameters(schema: Any, param: str) -> None:
    if not isinstance(schema, dict):
        raise ToolError(f"'{param}' must be a JSON Schema object", param)
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as err:
        where = "".join(f"[{p!r}]" for p in err.path)
        raise ToolError(f"'{param}' is not a valid JSON Schema (Draft 2020-12){' at ' + where if where else ''}: {err.message}", param) from None
    kind = schema.get("type", "object")
    if kind != "object":
        raise ToolError(f"'{param}' must be a schema of type 'object' (got {kind!r})", param)


def parse_tool_choice(raw: Any, tools: Sequence[ToolSpec]) -> ToolChoice:
    """`tool_choice` -> ToolChoice. None means "auto" with tools and "none" without (OpenAI's
    defaults); "required" and a named function need tools, and the name must be one of them."""
    if raw is None:
        return ToolChoice("auto" if tools else "none")
    if isinstance(raw, str):
        if raw not in ("none", "auto", "required"):
            raise ToolError(f"'tool_choice' must be 'none', 'auto', 'required' or a function object (got {raw!r})", "tool_choice")
        if raw in ("auto", "required") and not tools:
            raise ToolError(f"'tool_choice' {raw!r} needs a non-empty 'tools'", "tool_choice")
        return ToolChoice(raw)  # type: ignore[arg-type]  # checked against the three literals above
    if isinstance(raw, dict) and raw.get("type") == "function" and isinstance(raw.get("function"), dict):
        name = raw["function"].get("name")
        known = [t.name for t in tools]
        if not isinstance(name, str) or name not in known:
            raise ToolError(f"'tool_choice' names function {name!r}, which is not in 'tools' ({', '.join(known) or 'none given'})", "tool_choice")
        return ToolChoice("named", name)
    raise ToolError("'tool_choice' must be 'none', 'auto', 'required' or {\"type\": \"function\", \"function\": {\"name\": ...}}", "tool_choice")
