"""JSON Schema -> GBNF (llama.cpp's grammar syntax): our own converter.

Why not llama.cpp's (`llama_cpp.llama_grammar.json_schema_to_gbnf`): the parent process templates
and checks requests without importing llama.cpp, and that converter drops what it cannot express
(`pattern` it turns into a loose regex, unknown keywords it ignores), so a schema could be accepted
and then not enforced. Here every keyword is either enforced, harmless to leave out (annotations;
keywords that only restrict values we never generate, see below), or refused with a ToolError
naming `param`.

The layout is fixed and compact, exactly Python's `json.dumps` default: `", "` between items,
`": "` after keys, no other whitespace, properties in their declared order. One layout means a
call's text is deterministic to parse and to stream, and no tokens are spent on free whitespace.

What is supported (everything else is a ToolError):
- `type` (a name or a list), `enum`, `const` (any JSON values; each is checked against the rest of
  its schema with jsonschema and kept only if valid), `anyOf`, `oneOf` (only when its branches are
  disjoint by JSON type or are disjoint literals, so any branch's value matches exactly one),
  `allOf` of one schema, `$ref` to `#/$defs/...` or `#/definitions/...` (recursion allowed).
- object: `properties` (declared order; required ones always, optional ones may be left out),
  `required` (a name without a property gets any JSON value, or `additionalProperties`' schema).
  `additionalProperties` of any value: we never generate undeclared properties, which every value
  of it allows.
- string: `minLength`, `maxLength` (at most 4096), `format` `date`, `time`, `date-time`, `uuid`
  (enforced by their grammar; others are refused, since the caller relies on them).
  `pattern` is refused: regular expressions are not translated.
- integer: `minimum`, `maximum`, `exclusiveMinimum`, `exclusiveMaximum`, enforced exactly (a digit
  range grammar). number: `minimum` / `maximum` with integral bounds and a minimum >= 0 when one
  is given (e.g. 0..1, 0..100); other number bounds and `multipleOf` are refused.
  Integers have at most 16 digits, fractions at most 16, exponents 3 (so generation terminates).
- array: `items`, `minItems`, `maxItems` (at most 256 when > 0), `uniqueItems: false`.
- strings contain no raw control characters (JSON escapes, `\\uXXXX` included, are allowed).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Mapping, Sequence

import jsonschema

from .spec import ToolError

ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$comment", "deprecated", "readOnly", "writeOnly", "$schema"})
STRUCTURE = frozenset({"$defs", "definitions"})  # read only through $ref
KEYWORDS = frozenset({
    "type", "enum", "const", "anyOf", "oneOf", "allOf", "$ref",
    "properties", "required", "additionalProperties",
    "minLength", "maxLength", "format",
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
    "items", "minItems", "maxItems", "uniqueItems",
})
TYPES = ("object", "array", "string", "integer", "number", "boolean", "null")
MAX_LENGTH = 4096  # maxLength above this: the {m,n} expansion grows the grammar for no real use
MAX_ITEMS = 256
INT_DIGITS = 16  # an integer's digits at most: within float64's exact range, and generation ends
MAX_INT = 10**INT_DIGITS - 1

CHAR = r'[^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4})'
DIGITS = "[0-9]"
FRACTION = '"." [0-9]{1,16}'
EXPONENT = '[eE] [-+]? [0-9]{1,3}'
FORMATS = {
    "date": '[0-9]{4} "-" ("0" [1-9] | "1" [0-2]) "-" ("0" [1-9] | [12] [0-9] | "3" [01])',
    "time": '([01] [0-9] | "2" [0-3]) ":" [0-5] [0-9] ":" [0-5] [0-9] ("." [0-9]{1,6})? ("Z" | [+-] ([01] [0-9] | "2" [0-3]) ":" [0-5] [0-9])',
    "uuid": '[0-9a-f]{8} "-" [0-9a-f]{4} "-" [0-9a-f]{4} "-" [0-9a-f]{4} "-" [0-9a-f]{12}',
}
FORMATS["date-time"] = f'{FORMATS["date"]} "T" {FORMATS["time"]}'


def schema_to_gbnf(schema: Mapping[str, Any], prefix: str, param: str) -> list[str]:
    """GBNF rules ("name ::= body" lines) whose start symbol is `prefix`, matching JSON texts valid
    under `schema` in json.dumps' default layout. Every rule name starts with `prefix`, so several
    schemas' rules can share one grammar. Raises ToolError(param=param) for every keyword it
    cannot enforce, saying where in the schema."""
    if not re.fullmatch(r"[a-zA-Z0-9]+(-[a-zA-Z0-9]+)*", prefix):
        raise ValueError(f"a GBNF rule prefix is words of letters and digits joined by single '-' (got {prefix!r})")
    conv = _Converter(schema, prefix, param)
    conv.define(prefix, conv.expr(schema, ""))
    return [f"{name} ::= {body}" for name, body in conv.rules.items()]


def literal(text: str) -> str:
    """A GBNF string literal matching `text` exactly."""
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def dumps(value: Any) -> str:
    """The one layout every generated value has (json.dumps' separators, UTF-8 kept as is)."""
    return json.dumps(value, ensure_ascii=False)


class _Converter:
    def __init__(self, root: Mapping[str, Any], prefix: str, param: str) -> None:
        self.root = root
        self.prefix = prefix
        self.param = param
        self.rules: dict[str, str] = {}
        self.refs: dict[str, str] = {}  # "$ref" -> the rule it became

    # -- rules and errors ------------------------------------------------------------------------

    def define(self, name: str, body: str) -> str:
        self.rules[name] = body
        return name

    def fresh(self, path: str) -> str:
        base = f"{self.prefix}-{re.sub(r'[^a-zA-Z0-9]+', '-', path).strip('-') or 'v'}"
        name, n = base, 1
        while name in self.rules or name == self.prefix:
            n += 1
            name = f"{base}-{n}"
        self.rules[name] = ""  # reserved now, so a recursive $ref sees it
        return name

    def shared(self, kind: str, body: str) -> str:
        """One rule per primitive (string, number, any value...) per prefix. Helper names hold
        "--", which `fresh` never makes, so they cannot collide with a property's rule."""
        name = f"{self.prefix}--{kind}"
        if name not in self.rules:
            self.rules[name] = body
        return name

    def fail(self, path: str, message: str) -> ToolError:
        where = f" at '{path}'" if path else ""
        return ToolError(f"'{self.param}'{where}: {message}", self.param)

    # -- the schema walk -------------------------------------------------------------------------

    def expr(self, schema: Any, path: str) -> str:
        """A GBNF expression (usually one rule name) for the values valid under `schema`."""
        if schema is True or schema == {}:
            return self.any_value()
        if schema is False:
            raise self.fail(path, "the schema 'false' allows no value")
        if not isinstance(schema, Mapping):
            raise self.fail(path, "a schema must be an object or a boolean")
        unknown = sorted(set(schema) - KEYWORDS - ANNOTATIONS - STRUCTURE)
        if unknown:
            raise self.fail(path, f"JSON Schema keyword {unknown[0]!r} is not supported (it cannot be enforced while generating)")
        active = {k: v for k, v in schema.items() if k in KEYWORDS}
        if not active:
            return self.any_value()
        if "enum" in active or "const" in active:
            return self.literals(schema, path)
        if "$ref" in active:
            return self.ref(active, path)
        if "allOf" in active:
            return self.all_of(active, path)
        if "anyOf" in active or "oneOf" in active:
            return self.alternatives(active, path)
        types = self.types_of(active, path)
        exprs = [self.typed(t, active, f"{path}" if len(types) == 1 else f"{path}/{t}") for t in types]
        return exprs[0] if len(exprs) == 1 else self.define(self.fresh(path or "root"), " | ".join(exprs))

    def types_of(self, schema: Mapping[str, Any], path: str) -> list[str]:
        kind = schema.get("type")
        if kind is None:  # inferred from the keywords present
            keys = set(schema)
            if keys & {"properties", "required", "additionalProperties"}:
                return ["object"]
            if keys & {"items", "minItems", "maxItems", "uniqueItems"}:
                return ["array"]
            if keys & {"minLength", "maxLength", "format"}:
                return ["string"]
            if keys & {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"}:
                return ["number"]
            return list(TYPES)
        kinds = [kind] if isinstance(kind, str) else list(kind)
        if "number" in kinds and "integer" in kinds:  # every integer is a number
            kinds.remove("integer")
        return kinds

    def typed(self, kind: str, schema: Mapping[str, Any], path: str) -> str:
        if kind == "object":
            return self.object(schema, path)
        if kind == "array":
            return self.array(schema, path)
        if kind == "string":
            return self.string(schema, path)
        if kind == "integer":
            return self.integer(schema, path)
        if kind == "number":
            return self.number(schema, path)
        if kind == "boolean":
            return self.shared("boolean", '"true" | "false"')
        return self.shared("null", '"null"')

    def literals(self, schema: Mapping[str, Any], path: str) -> str:
        values = [schema["const"]] if "const" in schema else list(schema["enum"])
        rest = {k: v for k, v in schema.items() if k not in ("enum", "const", "$defs", "definitions")}
        if "$ref" not in json.dumps(rest) and set(rest) - ANNOTATIONS:  # a $ref would need the root to resolve
            check = jsonschema.Draft202012Validator(rest)
            values = [v for v in values if check.is_valid(v)]
        if not values:
            raise self.fail(path, "no value of 'enum' / 'const' is valid under the rest of the schema")
        return self.define(self.fresh(path or "root"), " | ".join(literal(dumps(v)) for v in values))

    def ref(self, schema: Mapping[str, Any], path: str) -> str:
        if set(schema) - {"$ref"}:
            raise self.fail(path, "'$ref' beside other keywords is not supported")
        ref = schema["$ref"]
        if ref in self.refs:
            return self.refs[ref]
        m = re.fullmatch(r"#/(\$defs|definitions)/([^/]+)", str(ref))
        defs = self.root.get(m.group(1)) if m else None
        if not m or not isinstance(defs, Mapping) or m.group(2) not in defs:
            raise self.fail(path, f"'$ref' {ref!r} must point into this schema's '$defs' (or 'definitions')")
        name = self.fresh(f"def-{m.group(2)}")
        self.refs[ref] = name
        self.define(name, self.expr(defs[m.group(2)], f"{m.group(1)}/{m.group(2)}"))
        return name

    def all_of(self, schema: Mapping[str, Any], path: str) -> str:
        parts = schema["allOf"]
        if len(parts) != 1 or set(schema) - {"allOf"}:
            raise self.fail(path, "'allOf' is supported only as the single keyword with one schema")
        return self.expr(parts[0], f"{path}/allOf/0")

    def alternatives(self, schema: Mapping[str, Any], path: str) -> str:
        key = "anyOf" if "anyOf" in schema else "oneOf"
        if set(schema) - {key}:
            raise self.fail(path, f"'{key}' beside other keywords is not supported")
        branches = schema[key]
        if key == "oneOf":
            self.check_disjoint(branches, path)
        exprs = [self.expr(b, f"{path}/{key}/{i}") for i, b in enumerate(branches)]
        return self.define(self.fresh(path or "root"), " | ".join(exprs))

    def check_disjoint(self, branches: Sequence[Any], path: str) -> None:
        """oneOf means exactly one branch: enforced only where no value can match two."""
        seen: list[set[str]] = []
        for b in branches:
            kinds = self.branch_values(b, path)
            if any(kinds & other for other in seen):
                raise self.fail(path, "'oneOf' whose branches can match the same value is not supported (use 'anyOf')")
            seen.append(kinds)

    def branch_values(self, branch: Any, path: str) -> set[str]:
        """What a branch can produce, coarsely: its JSON types, or its literal values."""
        if not isinstance(branch, Mapping):
            return set(TYPES)
        if "$ref" in branch and len(branch) == 1:
            m = re.fullmatch(r"#/(\$defs|definitions)/([^/]+)", str(branch["$ref"]))
            target = (self.root.get(m.group(1)) or {}).get(m.group(2)) if m else None
            return self.branch_values(target, path) if isinstance(target, Mapping) else set(TYPES)
        if "const" in branch:
            return {"=" + dumps(branch["const"])}
        if "enum" in branch:
            return {"=" + dumps(v) for v in branch["enum"]}
        kinds = set(self.types_of(branch, path))
        if "number" in kinds:
            kinds.add("integer")
        return kinds

    # -- objects and arrays ----------------------------------------------------------------------

    def object(self, schema: Mapping[str, Any], path: str) -> str:
        props = dict(schema.get("properties") or {})
        required = list(schema.get("required") or [])
        extra = schema.get("additionalProperties", True)
        for name in required:
            if name not in props:
                if extra is False:
                    raise self.fail(path, f"required property {name!r} is not in 'properties' and 'additionalProperties' is false")
                props[name] = {} if extra is True else extra
        items = [(literal(dumps(k) + ": ") + " " + self.expr(v, f"{path}/{k}"), k in required) for k, v in props.items()]
        name = self.fresh(path or "root")
        body = self.property_sequence(name, items)
        return self.define(name, f'"{{" {body} "}}"' if body else '"{}"')

    def property_sequence(self, name: str, items: list[tuple[str, bool]]) -> str:
        """The properties in order, joined by ", ": required ones always present, optional ones
        maybe. `first_i` (properties i.. with nothing written yet) and `rest_i` (something written,
        so each next property starts with ", ") are rules, so the grammar stays linear in the
        number of properties."""
        n = len(items)
        rest = [""] * (n + 1)
        first = [""] * (n + 1)
        for i in range(n - 1, -1, -1):
            kv, req = items[i]
            step = f'", " {kv}' if req else f'(", " {kv})?'
            rest[i] = self.define(f"{name}--r{i}", _seq(step, rest[i + 1]))
            here = _seq(kv, rest[i + 1])
            if req:
                first[i] = here
            elif i == n - 1:
                first[i] = f"({here})?"
            else:
                first[i] = f"({here} | {first[i + 1]})"
            first[i] = self.define(f"{name}--f{i}", first[i])
        return first[0]

    def array(self, schema: Mapping[str, Any], path: str) -> str:
        if schema.get("uniqueItems") is True:
            raise self.fail(path, "'uniqueItems: true' is not supported")
        lo = int(schema.get("minItems", 0))
        hi = schema.get("maxItems")
        if hi is not None and int(hi) > MAX_ITEMS:
            raise self.fail(path, f"'maxItems' above {MAX_ITEMS} is not supported")
        if hi is not None and int(hi) < lo:
            raise self.fail(path, "'maxItems' is below 'minItems'")
        name = self.fresh(path or "root")
        if hi == 0:
            return self.define(name, '"[]"')
        item = self.expr(schema.get("items", True), f"{path}/items")
        more = f'(", " {item})' + _repeat(max(lo - 1, 0), None if hi is None else int(hi) - 1)
        seq = f"{item} {more}"
        return self.define(name, f'"[" {seq} "]"' if lo > 0 else f'"[" ({seq})? "]"')

    # -- scalars ---------------------------------------------------------------------------------

    def string(self, schema: Mapping[str, Any], path: str) -> str:
        fmt = schema.get("format")
        lo, hi = schema.get("minLength"), schema.get("maxLength")
        if fmt is not None:
            if fmt not in FORMATS:
                raise self.fail(path, f"string format {fmt!r} is not supported (supported: {', '.join(sorted(FORMATS))})")
            if lo is not None or hi is not None:
                raise self.fail(path, "'format' with 'minLength' / 'maxLength' is not supported")
            return self.shared(f"format-{fmt}", f'"\\"" {FORMATS[fmt]} "\\""')
        char = self.shared("char", CHAR)
        if lo is None and hi is None:
            return self.shared("string", f'"\\"" {char}* "\\""')
        lo = int(lo or 0)
        if hi is not None and int(hi) > MAX_LENGTH:
            raise self.fail(path, f"'maxLength' above {MAX_LENGTH} is not supported")
        if hi is not None and int(hi) < lo:
            raise self.fail(path, "'maxLength' is below 'minLength'")
        return self.define(self.fresh(path or "root"), f'"\\"" {char}{_repeat(lo, None if hi is None else int(hi))} "\\""')

    def integer(self, schema: Mapping[str, Any], path: str) -> str:
        lo, hi = _int_bounds(schema)
        if lo is None and hi is None:
            return self.shared("integer", '"0" | "-"? [1-9] [0-9]{0,15}')
        lo = -MAX_INT if lo is None else max(lo, -MAX_INT)
        hi = MAX_INT if hi is None else min(hi, MAX_INT)
        if lo > hi:
            raise self.fail(path, "no integer lies within its minimum and maximum")
        return self.define(self.fresh(path or "root"), int_range(lo, hi))

    def number(self, schema: Mapping[str, Any], path: str) -> str:
        keys = set(schema)
        if keys & {"exclusiveMinimum", "exclusiveMaximum"}:
            raise self.fail(path, "'exclusiveMinimum' / 'exclusiveMaximum' on a number are not supported (they are on integers)")
        lo, hi = schema.get("minimum"), schema.get("maximum")
        if lo is None and hi is None:
            return self.shared("number", f'"-"? ("0" | [1-9] [0-9]{{0,15}}) ({FRACTION})? ({EXPONENT})?')
        if any(b is not None and (isinstance(b, bool) or float(b) != math.floor(b)) for b in (lo, hi)) or (lo is not None and lo < 0):
            raise self.fail(path, "number bounds are supported only when they are whole numbers and 'minimum' is >= 0")
        lo_i = 0 if lo is None else int(lo)
        if hi is None:
            body = f"({int_range(lo_i, MAX_INT)}) ({FRACTION})?"
        elif int(hi) < lo_i:
            raise self.fail(path, "no number lies within its minimum and maximum")
        else:
            top = f'"{int(hi)}" ("." "0"{{1,16}})?'
            body = top if int(hi) == lo_i else f"({int_range(lo_i, int(hi) - 1)}) ({FRACTION})? | {top}"
        if lo is None:  # every negative number is below a maximum >= 0
            body = f'"-" ("0" | [1-9] [0-9]{{0,15}}) ({FRACTION})? | {body}'
        return self.define(self.fresh(path or "root"), body)

    def any_value(self) -> str:
        value = f"{self.prefix}--value"
        if value not in self.rules:
            string = self.string({}, "")
            number = self.number({}, "")
            self.rules[value] = ""
            member = f'{string} ": " {value}'
            self.define(f"{self.prefix}--anyobject", f'"{{" ({member} (", " {member})*)? "}}"')
            self.define(f"{self.prefix}--anyarray", f'"[" ({value} (", " {value})*)? "]"')
            self.define(value, f'{self.prefix}--anyobject | {self.prefix}--anyarray | {string} | {number} | "true" | "false" | "null"')
        return value


def _seq(*parts: str) -> str:
    return " ".join(p for p in parts if p)


def _repeat(lo: int, hi: int | None) -> str:
    if hi is None:
        return {0: "*", 1: "+"}.get(lo, f"{{{lo},}}")
    if (lo, hi) == (0, 1):
        return "?"
    return f"{{{lo}}}" if lo == hi else f"{{{lo},{hi}}}"


def _int_bounds(schema: Mapping[str, Any]) -> tuple[int | None, int | None]:
    """Inclusive integer bounds from minimum / maximum / exclusive* (numbers as JSON Schema 2020-12)."""
    lows = [math.ceil(schema["minimum"])] if "minimum" in schema else []
    if "exclusiveMinimum" in schema:
        lows.append(math.floor(schema["exclusiveMinimum"]) + 1)
    highs = [math.floor(schema["maximum"])] if "maximum" in schema else []
    if "exclusiveMaximum" in schema:
        highs.append(math.ceil(schema["exclusiveMaximum"]) - 1)
    return (max(lows) if lows else None), (min(highs) if highs else None)


def int_range(lo: int, hi: int) -> str:
    """A GBNF expression for the canonical decimal texts of the integers lo..hi (no "-0", no
    leading zeros). Negative ones are "-" and a positive range."""
    alts: list[str] = []
    if lo < 0:
        neg_hi, neg_lo = -lo, max(1, -hi) if hi < 0 else 1
        alts.append(f'"-" ({_nonneg_range(neg_lo, neg_hi)})')
    if hi >= 0:
        alts.append(_nonneg_range(max(lo, 0), hi))
    return " | ".join(alts)


def _nonneg_range(lo: int, hi: int) -> str:
    alts: list[str] = []
    for width in range(len(str(lo)), len(str(hi)) + 1):
        a = max(lo, 10 ** (width - 1) if width > 1 else 0)
        b = min(hi, 10**width - 1)
        if a <= b:
            alts.extend(_same_width(str(a), str(b)))
    return " | ".join(alts)


def _same_width(a: str, b: str) -> list[str]:
    """Alternatives (each a sequence of char classes) for the digit strings a..b of one width."""
    if len(a) == 1:
        return [f"[{a}-{b}]" if a != b else f'"{a}"']
    if a[0] == b[0]:
        return [f'"{a[0]}" ({alt})' for alt in [" | ".join(_same_width(a[1:], b[1:]))]]
    n = len(a) - 1
    out: list[str] = []
    first, last = int(a[0]), int(b[0])
    if a[1:] != "0" * n:
        out.append(f'"{a[0]}" ({" | ".join(_same_width(a[1:], "9" * n))})')
        first += 1
    tail_full = b[1:] == "9" * n
    if not tail_full:
        last -= 1
    if first <= last:
        out.append(f"[{first}-{last}] [0-9]{{{n}}}" if first != last else f'"{first}" [0-9]{{{n}}}')
    if not tail_full:
        out.append(f'"{b[0]}" ({" | ".join(_same_width("0" * n, b[1:]))})')
    return out
