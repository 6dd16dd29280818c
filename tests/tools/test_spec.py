"""parse_tools / parse_tool_choice: OpenAI's fields checked, every refusal naming its field."""

from __future__ import annotations

import re
from typing import Any

import pytest

from capibara6.tools.spec import ToolChoice, ToolError, new_call_id, parse_tool_choice, parse_tools


def fn(name: str = "get_weather", **extra: Any) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, **extra}}


def refused(raw: Any) -> ToolError:
    with pytest.raises(ToolError) as info:
        parse_tools(raw)
    return info.value


def test_a_tool_without_parameters_takes_an_empty_object() -> None:
    (spec,) = parse_tools([fn(description="Weather now")])
    assert spec.name == "get_weather" and spec.description == "Weather now" and spec.strict is False
    assert spec.parameters == {"type": "object", "properties": {}}


def test_parameters_and_strict_are_kept() -> None:
    params = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    (spec,) = parse_tools([fn(parameters=params, strict=True)])
    assert spec.parameters == params and spec.strict is True


@pytest.mark.parametrize(
    "raw, param",
    [
        ([{"type": "code_interpreter"}], "tools[0].type"),
        ([fn(), {"type": "function"}], "tools[1].function"),
        ([fn("has space")], "tools[0].function.name"),
        ([fn("x" * 65)], "tools[0].function.name"),
        ([fn("a"), fn("b"), fn("a")], "tools[2].function.name"),
        ([fn(parameters={"type": "object", "properties": {"a": {"type": "strin"}}})], "tools[0].function.parameters"),
        ([fn(parameters={"type": "array"})], "tools[0].function.parameters"),
        ([fn(parameters=[1])], "tools[0].function.parameters"),
        ([fn(strict="yes")], "tools[0].function.strict"),
        ("nope", "tools"),
    ],
)
def test_refusals_name_the_field(raw: Any, param: str) -> None:
    assert refused(raw).param == param


def test_a_schema_error_says_where_in_the_schema() -> None:
    err = refused([fn(parameters={"type": "object", "properties": {"a": {"type": "strin"}}})])
    assert "['properties']['a']['type']" in str(err)


def test_tool_choice_defaults_follow_openai() -> None:
    tools = parse_tools([fn("a"), fn("b")])
    assert parse_tool_choice(None, tools) == ToolChoice("auto")
    assert parse_tool_choice(None, ()) == ToolChoice("none")
    assert parse_tool_choice("none", ()) == ToolChoice("none")
    assert parse_tool_choice("required", tools) == ToolChoice("required")
    assert parse_tool_choice({"type": "function", "function": {"name": "b"}}, tools) == ToolChoice("named", "b")


@pytest.mark.parametrize(
    "choice, with_tools",
    [
        ({"type": "function", "function": {"name": "c"}}, True),
        ({"type": "function", "function": {"name": "a"}}, False),
        ("required", False),
        ("auto", False),
        ("sometimes", True),
        ({"type": "function"}, True),
    ],
)
def test_bad_tool_choice_names_tool_choice(choice: Any, with_tools: bool) -> None:
    tools = parse_tools([fn("a"), fn("b")]) if with_tools else ()
    with pytest.raises(ToolError) as info:
        parse_tool_choice(choice, tools)
    assert info.value.param == "tool_choice"


def test_call_ids_have_openais_shape_and_differ() -> None:
    ids = {new_call_id() for _ in range(50)}
    assert len(ids) == 50
    assert all(re.fullmatch(r"call_[A-Za-z0-9]{24}", i) for i in ids)
