"""JSON Schema -> GBNF, checked by llama.cpp's own grammar sampler (tests/tools/conftest.py):
each grammar compiles, accepts json.dumps of values valid under its schema and rejects invalid
ones or other layouts; unsupported keywords are refused naming the field."""

from __future__ import annotations

import json
import random
import re
from typing import Any

import jsonschema
import pytest

from capibara6.tools.schema_grammar import int_range, schema_to_gbnf
from capibara6.tools.spec import ToolError
from tests.tools.conftest import GrammarChecker

PARAM = "tools[0].function.parameters"


def grammar(schema: Any) -> str:
    return "root ::= v\n" + "\n".join(schema_to_gbnf(schema, "v", PARAM)) + "\n"


CASES: list[tuple[dict[str, Any], list[Any], list[str]]] = [
    # (schema, valid values (as json.dumps writes them), texts that must be rejected)
    ({"type": "string"}, ["", "a b", "é\n\"q\"", "\\"], ['"a\nb"', "'a'", "1"]),
    ({"type": "string", "minLength": 2, "maxLength": 4}, ["ab", "abcd"], ['"a"', '"abcde"']),
    ({"type": "string", "enum": ["red", "green"]}, ["red", "green"], ['"blue"', '"re"']),
    ({"enum": [1, "a", None, [1, 2], {"k": True}]}, [1, "a", None, [1, 2], {"k": True}], ["2", '[1,2]', '{"k":true}']),
    ({"const": "fixed"}, ["fixed"], ['"other"']),
    ({"type": "integer"}, [0, -7, 1234567890123456], ["1.5", "01", "-0", "1e3", '"1"']),
    ({"type": "integer", "minimum": -12, "maximum": 305}, [-12, -1, 0, 9, 10, 99, 100, 305], ["-13", "306", "1000", "-100"]),
    ({"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 10}, [1, 9], ["0", "10"]),
    ({"type": "number"}, [0, -1.5, 3.25, 1e-05, 12], ["1.", ".5", "+1", "NaN", "--1"]),
    ({"type": "number", "minimum": 0, "maximum": 1}, [0, 0.5, 0.999, 1, 1.0], ["1.5", "-0.1", "2", "1.01"]),
    ({"type": "number", "maximum": 10}, [-1000.5, 0, 9.75, 10], ["10.5", "11"]),
    ({"type": "boolean"}, [True, False], ["True", "1"]),
    ({"type": "null"}, [None], ["None", '""']),
    ({"type": ["string", "null"]}, ["x", None], ["1"]),
    ({"type": "array", "items": {"type": "integer"}}, [[], [1], [1, 2, 3]], ["[1,2]", "[1, ]", '["a"]']),
    ({"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 2}, [["a"], ["a", "b"]], ["[]", '["a", "b", "c"]']),
    ({"type": "array"}, [[], [1, "a", None, {"k": [True]}]], ["[1,]"]),
    (
        {"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "integer"}, "c": {"type": "boolean"}}, "required": ["b"]},
        [{"b": 1}, {"a": "x", "b": 1}, {"b": 1, "c": True}, {"a": "", "b": 0, "c": False}],
        ["{}", '{"c": true, "b": 1}', '{"b":1}', '{"b": 1, "d": 2}', '{"a": "x"}'],
    ),
    ({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}, [{}, {"a": 1}, {"b": 2}, {"a": 1, "b": 2}], ['{"b": 2, "a": 1}', '{, "b": 2}']),
    (
        {"type": "object", "properties": {"loc": {"type": "object", "properties": {"lat": {"type": "number"}, "tags": {"type": "array", "items": {"enum": ["x", "y"]}}},
                                                   "required": ["lat", "tags"]}}, "required": ["loc"]},
        [{"loc": {"lat": 1.5, "tags": ["x", "y"]}}, {"loc": {"lat": -2, "tags": []}}],
        ['{"loc": {"lat": 1.5}}', '{"loc": {"lat": 1, "tags": ["z"]}}'],
    ),
    ({"anyOf": [{"type": "string", "maxLength": 2}, {"type": "integer", "minimum": 0}]}, ["ab", 5], ['"abc"', "-1"]),
    ({"oneOf": [{"type": "string"}, {"type": "boolean"}]}, ["s", True], ["null"]),
    (
        {"type": "object", "properties": {"tree": {"$ref": "#/$defs/node"}}, "required": ["tree"],
         "$defs": {"node": {"type": "object", "properties": {"v": {"type": "integer"}, "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}}, "required": ["v"]}}},
        [{"tree": {"v": 1}}, {"tree": {"v": 1, "kids": [{"v": 2, "kids": []}, {"v": 3}]}}],
        ['{"tree": {"kids": []}}'],
    ),
    ({"type": "object", "properties": {"x": {"allOf": [{"$ref": "#/definitions/d"}], "description": "d"}}, "required": ["x"],
      "definitions": {"d": {"type": "string", "enum": ["a"]}}}, [{"x": "a"}], ['{"x": "b"}']),
    ({"type": "object", "required": ["free"]}, [{"free": 1}, {"free": {"a": [None]}}], ["{}"]),
    ({"type": "string", "format": "date"}, ["2024-02-29"], ['"2024-13-01"', '"24-01-01"']),
    ({"type": "string", "format": "date-time"}, ["2024-02-29T13:05:00Z", "2024-02-29T13:05:00.123+02:00"], ['"2024-02-29 13:05"']),
    ({"type": "string", "format": "uuid"}, ["123e4567-e89b-12d3-a456-426614174000"], ['"123e4567"']),
    ({"type": "string", "title": "t", "description": "d", "examples": ["x"], "default": "x"}, ["anything"], ["1"]),
]


@pytest.mark.parametrize("schema, valid, invalid", CASES, ids=[json.dumps(c[0])[:60] for c in CASES])
def test_grammar_accepts_valid_values_and_rejects_others(grammar_checker: GrammarChecker, schema: Any, valid: list[Any], invalid: list[str]) -> None:
    g = grammar(schema)
    assert grammar_checker.compiles(g), g
    for value in valid:
        jsonschema.validate(value, schema)  # the case itself is right
        assert grammar_checker.accepts(g, json.dumps(value, ensure_ascii=False)), (value, g)
    for text in invalid:
        assert not grammar_checker.accepts(g, text), (text, g)


def test_rule_names_cannot_collide_between_properties_and_helpers(grammar_checker: GrammarChecker) -> None:
    """Properties named like the converter's own rules get rules of their own."""
    schema = {"type": "object", "properties": {n: {"type": "integer", "maximum": 3} for n in ("string", "char", "root", "value", "r0", "f0")},
              "required": ["string", "char", "root", "value", "r0", "f0"]}
    g = grammar(schema)
    value = {n: 3 for n in schema["properties"]}
    assert grammar_checker.accepts(g, json.dumps(value))
    assert not grammar_checker.accepts(g, json.dumps({**value, "char": 4}))


def _regex(expr: str) -> str:
    """int_range's expressions use only literals, classes, {n}, groups and |: a Python regex."""
    return expr.replace('"', "").replace(" ", "")


def test_int_range_is_exactly_the_range() -> None:
    rng = random.Random(16)
    bounds = [(0, 0), (0, 9), (1, 10), (-5, 5), (-100, -7), (7, 1234), (99, 100), (10, 19), (-1, 0)]
    bounds += [tuple(sorted((rng.randint(-3000, 3000), rng.randint(-3000, 3000)))) for _ in range(60)]
    for lo, hi in bounds:
        pattern = re.compile(_regex(int_range(lo, hi)))
        for n in range(lo - 30, hi + 31):
            assert bool(pattern.fullmatch(str(n))) == (lo <= n <= hi), (lo, hi, n)
        assert not pattern.fullmatch("-0") and not pattern.fullmatch("0" + str(abs(hi)))


@pytest.mark.parametrize(
    "schema, where, words",
    [
        ({"type": "string", "pattern": "^a+$"}, "", "'pattern'"),
        ({"type": "object", "properties": {"mail": {"type": "string", "format": "email"}}}, "/mail", "'email'"),
        ({"type": "array", "uniqueItems": True}, "", "uniqueItems"),
        ({"oneOf": [{"type": "string"}, {"type": "string", "maxLength": 3}]}, "", "anyOf"),
        ({"$ref": "https://example.com/s.json"}, "", "$defs"),
        ({"allOf": [{"type": "string"}, {"maxLength": 3}]}, "", "allOf"),
        ({"type": "number", "minimum": 0.5}, "", "whole numbers"),
        ({"type": "number", "exclusiveMinimum": 0}, "", "exclusiveMinimum"),
        ({"type": "integer", "multipleOf": 2}, "", "'multipleOf'"),
        ({"type": "string", "maxLength": 100000}, "", "maxLength"),
        ({"type": "object", "properties": {"a": False}, "required": ["a"]}, "/a", "false"),
        ({"type": "object", "required": ["x"], "additionalProperties": False}, "", "'x'"),
        ({"type": "string", "enum": [1, 2]}, "", "enum"),
        ({"type": "object", "patternProperties": {"^x": {}}}, "", "patternProperties"),
    ],
)
def test_unsupported_keywords_are_refused_naming_the_field(schema: Any, where: str, words: str) -> None:
    with pytest.raises(ToolError) as info:
        schema_to_gbnf(schema, "v", PARAM)
    assert info.value.param == PARAM
    assert words in str(info.value)
    if where:
        assert f"at '{where}'" in str(info.value)


def test_a_rule_prefix_must_be_a_gbnf_name() -> None:
    with pytest.raises(ValueError):
        schema_to_gbnf({"type": "string"}, "bad_name", PARAM)


def test_a_pydantic_model_schema_compiles_and_holds(grammar_checker: GrammarChecker) -> None:
    """What agent frameworks send: pydantic v2's schemas (titles, $defs, enums by $ref,
    Optional as anyOf with null, defaults, nested models)."""
    from enum import Enum
    from typing import Optional

    from pydantic import BaseModel, Field

    class Unit(str, Enum):
        c = "celsius"
        f = "fahrenheit"

    class Place(BaseModel):
        city: str = Field(description="City name", max_length=30)
        country: Optional[str] = None

    class Query(BaseModel):
        place: Place
        unit: Unit = Unit.c
        days: int = Field(default=1, ge=1, le=14)
        hourly: bool = False

    schema = Query.model_json_schema()
    g = grammar(schema)
    good = [{"place": {"city": "Oslo"}}, {"place": {"city": "Oslo", "country": None}, "unit": "fahrenheit", "days": 14, "hourly": True}]
    for value in good:
        Query.model_validate(value)
        assert grammar_checker.accepts(g, json.dumps(value)), value
    for text in ['{"place": {"city": "Oslo"}, "days": 15}', '{"place": {"city": "Oslo"}, "unit": "kelvin"}', '{"place": {}}']:
        assert not grammar_checker.accepts(g, text), text
