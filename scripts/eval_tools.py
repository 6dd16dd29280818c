#!/usr/bin/env python3
"""Tool-calling benchmark (issue 16): capibara6 vs llama-cpp-python's server on the same GGUF.

Twelve fixed prompts over four tools with varied schemas (strings, enums, integers with bounds,
numbers, a nested object, arrays, a date, a boolean): eight want one call to a named tool, four
want none. Each side answers every prompt greedily (temperature 0, repeat_penalty 1, --max-tokens):

- capibara6: `capibara6 serve` with one llamacpp entry for the GGUF (its own template, grammar
  constrained calls), `tool_choice` auto, required and named (the prompt's expected tool).
- anchor: `python -m llama_cpp.server --chat_format chatml-function-calling`, the same modes.
- unconstrained (auto only): the GGUF's own template rendered here with the tools
  (capibara6.chat_templates.render_template), sent to capibara6's /v1/completions without any
  grammar, the text parsed with capibara6.tools.formats.HermesFormat: what the model does alone.
  The row "unconstrained-lenient" scores the same texts, also taking any bare or ```json-fenced
  {"name": ..., "arguments": ...} object as a call (small models often skip the <tool_call> marker).

Both servers run one at a time, each with n_threads 1 and n_ctx 4096. Per side and mode:
  valid     answers whose calls all name a known tool with JSON-object arguments
            (auto: over the prompts that want a call; required: all prompts; named: the eight)
  schema    the same, and every call's arguments validate against the tool's parameters (jsonschema,
            formats checked)
  expected  the calls name exactly the tool the prompt wants (over the eight)
  no-call   auto only: prompts that want no call answered without one (a call there is "wrong";
            no call where one is wanted is "missed")
  calls ok  of the answers that attempted a call, the share that is schema-valid
  mean s    mean request latency; the JSON's latency_ratio is capibara6 / anchor per mode, over the
            prompts both answered without an error (null when there are none).
An HTTP error counts against every rate. The last line is JSON.

    python scripts/eval_tools.py [--model-path X.gguf] [--model-id qwen2.5-coder-0.5b] [--max-tokens 150]
                                 [--sides capibara6,anchor,unconstrained] [--modes auto,required,named]
                                 [--limit N] [--details]
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from capibara6.chat_templates import render_template  # noqa: E402
from capibara6.gguf_header import read_header  # noqa: E402

MODEL_ID = "qwen2.5-coder-0.5b"
MODES = ("auto", "required", "named")
SIDES = ("capibara6", "anchor", "unconstrained")

TOOLS: list[dict[str, Any]] = [
    {"type": "function", "function": {
        "name": "get_weather",
        "description": "Current weather for a city.",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "description": "City name, e.g. Paris"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        }, "required": ["city", "unit"]},
    }},
    {"type": "function", "function": {
        "name": "convert_currency",
        "description": "Convert an amount of money from one currency to another.",
        "parameters": {"type": "object", "properties": {
            "amount": {"type": "number", "minimum": 0},
            "from_currency": {"type": "string", "enum": ["USD", "EUR", "GBP", "JPY"]},
            "to_currency": {"type": "string", "enum": ["USD", "EUR", "GBP", "JPY"]},
        }, "required": ["amount", "from_currency", "to_currency"]},
    }},
    {"type": "function", "function": {
        "name": "create_event",
        "description": "Add an event to the calendar.",
        "parameters": {"type": "object", "properties": {
            "title": {"type": "string", "minLength": 1, "maxLength": 80},
            "date": {"type": "string", "format": "date", "description": "YYYY-MM-DD"},
            "attendees": {"type": "array", "items": {"type": "string"}, "maxItems": 10},
            "location": {"type": "object", "properties": {
                "building": {"type": "string"},
                "room": {"type": "integer", "minimum": 1, "maximum": 999},
            }, "required": ["building", "room"]},
        }, "required": ["title", "date", "attendees", "location"]},
    }},
    {"type": "function", "function": {
        "name": "search_products",
        "description": "Search the shop's catalogue.",
        "parameters": {"type": "object", "properties": {
            "query": {"type": "string"},
            "categories": {"type": "array", "items": {"type": "string", "enum": ["books", "electronics", "garden", "toys"]},
                           "minItems": 1, "maxItems": 3},
            "max_price": {"type": "number", "minimum": 0},
            "in_stock": {"type": "boolean"},
        }, "required": ["query", "categories", "in_stock"]},
    }},
]
TOOL_NAMES = [t["function"]["name"] for t in TOOLS]
VALIDATORS = {
    t["function"]["name"]: jsonschema.Draft202012Validator(
        t["function"]["parameters"], format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    for t in TOOLS
}

# (prompt, the tool it wants or None)
PROMPTS: list[tuple[str, str | None]] = [
    ("What's the weather like in Paris right now? Give it in celsius.", "get_weather"),
    ("Is it hot in Phoenix today? I use fahrenheit.", "get_weather"),
    ("How much is 250 US dollars in euros?", "convert_currency"),
    ("Convert 1200 yen to British pounds, please.", "convert_currency"),
    ("Put a meeting called 'Budget review' on 2025-03-14 with Ana and Luis in building B, room 204.", "create_event"),
    ("Schedule 'Team lunch' for 2025-07-01 in the Main building, room 12, attendees: Kim.", "create_event"),
    ("Find me books about gardening under 30 dollars that are in stock.", "search_products"),
    ("Search the electronics and toys categories for a remote control car, in stock only.", "search_products"),
    ("Write a haiku about autumn leaves.", None),
    ("What is the capital of Japan?", None),
    ("Explain in one sentence what a Python list comprehension is.", None),
    ("Hi! How are you doing today?", None),
]



# -- servers -----------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """A server subprocess, its log in the temp dir; `url` answers once `ready_path` gives 200."""

    def __init__(self, name: str, cmd: list[str], url: str, ready_path: str, tmp: Path) -> None:
        self.name, self.url, self.ready_path = name, url, ready_path
        self.log = tmp / f"{name}.log"
        self._logf = self.log.open("wb")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self._logf, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 300.0) -> Server:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + self.ready_path, timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"{self.name} not ready after {timeout:.0f} s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._logf.close()


def start_capibara6(gguf: Path, tmp: Path) -> Server:
    registry = {
        "pool": {"max_loaded": 1, "warmup": [MODEL_ID]},
        "models": {MODEL_ID: {"backend": "llamacpp", "source": {"path": str(gguf)}, "n_ctx": 4096,
                              "n_threads": 1, "parallel": 1, "idle_unload_s": 0}},
    }
    config = tmp / "models.yaml"
    config.write_text(yaml.safe_dump(registry, sort_keys=False))
    ports = [free_port() for _ in range(3)]
    cmd = [sys.executable, "-m", "capibara6", "serve", "--config", str(config), "--ports", ",".join(map(str, ports))]
    return Server("capibara6", cmd, f"http://127.0.0.1:{ports[0]}", "/ready", tmp)


def start_anchor(gguf: Path, tmp: Path) -> Server:
    port = free_port()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", MODEL_ID,
           "--chat_format", "chatml-function-calling", "--n_threads", "1", "--n_threads_batch", "1",
           "--n_ctx", "4096", "--host", "127.0.0.1", "--port", str(port), "--verbose", "False"]
    return Server("anchor", cmd, f"http://127.0.0.1:{port}", "/v1/models", tmp)


# -- requests ----------------------------------------------------------------------------------

@dataclass
class Answer:
    calls: list[tuple[str, str]] = field(default_factory=list)  # (name, arguments text)
    attempted: bool = False  # a call was made or begun (its marker written)
    content: str = ""
    error: str = ""
    seconds: float = 0.0


def tool_choice(mode: str, expected: str | None) -> Any:
    if mode == "named":
        return {"type": "function", "function": {"name": expected}}
    return mode


def ask_chat(client: httpx.Client, url: str, prompt: str, mode: str, expected: str | None, max_tokens: int) -> Answer:
    body = {"model": MODEL_ID, "messages": [{"role": "user", "content": prompt}], "tools": TOOLS,
            "tool_choice": tool_choice(mode, expected), "temperature": 0, "repeat_penalty": 1.0,
            "max_tokens": max_tokens}
    t0 = time.perf_counter()
    try:
        r = client.post(url + "/v1/chat/completions", json=body)
    except httpx.HTTPError as err:
        return Answer(error=f"{type(err).__name__}: {err}", seconds=time.perf_counter() - t0)
    seconds = time.perf_counter() - t0
    if r.status_code != 200:
        return Answer(error=f"HTTP {r.status_code}: {r.text[:160]}", seconds=seconds)
    msg = r.json()["choices"][0]["message"]
    calls = [(c["function"]["name"], c["function"]["arguments"]) for c in msg.get("tool_calls") or []]
    return Answer(calls, bool(calls), msg.get("content") or "", seconds=seconds)


def hermes_parser() -> Any:
    """capibara6's own Hermes parser (bare and fenced calls included), as the server reads answers."""
    from capibara6.tools.formats import HermesFormat
    from capibara6.tools.spec import parse_tools

    specs, fmt = parse_tools(TOOLS), HermesFormat()
    return lambda text: [(c.name, c.arguments) for c in fmt.parse(text, specs).calls]


def lenient_parse(text: str) -> list[tuple[str, str]]:
    """Any JSON object in the text with a string `name` and `arguments` (bare, or in a ```json
    fence): what a forgiving parser would take as calls when the model skips the <tool_call> marker."""
    dec, calls, i = json.JSONDecoder(), [], 0
    while (i := text.find("{", i)) != -1:
        try:
            obj, i = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            i += 1
            continue
        if isinstance(obj, dict) and isinstance(obj.get("name"), str) and "arguments" in obj:
            args = obj["arguments"]
            calls.append((obj["name"], args if isinstance(args, str) else json.dumps(args)))
    return calls


def ask_unconstrained(client: httpx.Client, url: str, template: str, prompt: str, max_tokens: int, parse: Any) -> Answer:
    text = render_template(template, [{"role": "user", "content": prompt}], TOOLS)
    body = {"model": MODEL_ID, "prompt": text, "temperature": 0, "repeat_penalty": 1.0, "max_tokens": max_tokens,
            "stop": ["<|im_end|>"]}
    t0 = time.perf_counter()
    try:
        r = client.post(url + "/v1/completions", json=body)
    except httpx.HTTPError as err:
        return Answer(error=f"{type(err).__name__}: {err}", seconds=time.perf_counter() - t0)
    seconds = time.perf_counter() - t0
    if r.status_code != 200:
        return Answer(error=f"HTTP {r.status_code}: {r.text[:160]}", seconds=seconds)
    out = r.json()["choices"][0]["text"]
    calls = parse(out)
    return Answer(calls, bool(calls) or "<tool_call>" in out, out, seconds=seconds)


# -- scoring -----------------------------------------------------------------------------------

def call_valid(name: str, arguments: str) -> bool:
    if name not in VALIDATORS:
        return False
    try:
        return isinstance(json.loads(arguments), dict)
    except (json.JSONDecodeError, TypeError):
        return False


def schema_valid(name: str, arguments: str) -> bool:
    return call_valid(name, arguments) and VALIDATORS[name].is_valid(json.loads(arguments))


def judge(a: Answer) -> dict[str, bool]:
    valid = a.attempted and bool(a.calls) and all(call_valid(n, x) for n, x in a.calls)
    return {"valid": valid, "schema": valid and all(schema_valid(n, x) for n, x in a.calls)}


def rate(hits: int, n: int) -> float | None:
    return round(hits / n, 3) if n else None


def score(mode: str, items: list[tuple[str, str | None]], answers: list[Answer]) -> dict[str, Any]:
    want = [(e, a) for (_, e), a in zip(items, answers) if e is not None]
    none = [a for (_, e), a in zip(items, answers) if e is None]
    graded = want if mode != "required" else [(e, a) for (_, e), a in zip(items, answers)]
    j = [judge(a) for _, a in graded]
    tried = [judge(a) for a in answers if a.attempted]
    out: dict[str, Any] = {
        "n": len(graded),
        "valid_call_rate": rate(sum(x["valid"] for x in j), len(j)),
        "schema_valid_rate": rate(sum(x["schema"] for x in j), len(j)),
        "expected_tool_rate": rate(sum(judge(a)["valid"] and {n for n, _ in a.calls} == {e} for e, a in want), len(want)),
        "calls_schema_valid": rate(sum(x["schema"] for x in tried), len(tried)),
        "errors": sum(bool(a.error) for a in answers),
        "mean_s": round(sum(a.seconds for a in answers) / len(answers), 3) if answers else None,
    }
    if mode == "auto":
        out["no_call_accuracy"] = rate(sum(not a.attempted and not a.error for a in none), len(none))
        out["missed"] = sum(not a.attempted for _, a in want)
        out["wrong"] = sum(a.attempted for a in none)
    return out


def prompts_for(mode: str, items: list[tuple[str, str | None]]) -> list[tuple[str, str | None]]:
    return [p for p in items if p[1] is not None] if mode == "named" else items


def show(side: str, mode: str, prompt: str, a: Answer) -> None:
    what = a.error or "; ".join(f"{n}({x})" for n, x in a.calls) or f"text: {a.content[:70]!r}"
    print(f"  [{side}/{mode}] {a.seconds:5.1f}s {prompt[:44]!r:48} -> {what[:150]}", file=sys.stderr)


# -- the run -----------------------------------------------------------------------------------

def resolve_gguf(args: argparse.Namespace) -> Path:
    """--model-path, else the registry entry --model-id in --config (capibara6's own resolution)."""
    if args.model_path:
        return Path(args.model_path).resolve()
    from capibara6.backends import model_path
    from capibara6.config import load_registry

    registry = load_registry(args.config)
    spec = registry.models.get(args.model_id)
    if spec is None:
        sys.exit(f"{args.config} has no model {args.model_id!r}: pass --model-path <gguf>")
    try:
        path = model_path(spec, Path(args.config).resolve().parent)
    except (FileNotFoundError, ImportError) as err:
        sys.exit(f"{args.model_id}: {err}\npass --model-path <gguf>")
    if path is None:
        sys.exit(f"{args.model_id} is a remote entry: pass --model-path <gguf>")
    return path


def run_side(side: str, server: Server, modes: list[str], items: list[tuple[str, str | None]], args: argparse.Namespace,
             results: dict[str, Any], latencies: dict[str, dict[str, list[float | None]]]) -> None:
    with httpx.Client(timeout=args.timeout) as client:
        ask_chat(client, server.url, "Hello", "auto", None, 8)  # warm-up, untimed
        for mode in modes:
            todo = prompts_for(mode, items)
            answers = []
            for prompt, expected in todo:
                answers.append(ask_chat(client, server.url, prompt, mode, expected, args.max_tokens))
                if args.details:
                    show(side, mode, prompt, answers[-1])
            results.setdefault(side, {})[mode] = score(mode, todo, answers)
            latencies.setdefault(side, {})[mode] = [None if a.error else a.seconds for a in answers]
            first_error = next((a.error for a in answers if a.error), "")
            if first_error:
                results[side][mode]["first_error"] = first_error[:160]


def run_unconstrained(server: Server, gguf: Path, items: list[tuple[str, str | None]], args: argparse.Namespace,
                      results: dict[str, Any]) -> str:
    template = read_header(gguf).metadata.get("tokenizer.chat_template")
    if not isinstance(template, str):
        sys.exit(f"{gguf} has no tokenizer.chat_template")
    parse = hermes_parser()
    with httpx.Client(timeout=args.timeout) as client:
        answers = []
        for prompt, _ in items:
            answers.append(ask_unconstrained(client, server.url, template, prompt, args.max_tokens, parse))
            if args.details:
                show("unconstrained", "auto", prompt, answers[-1])
    results["unconstrained"] = {"auto": score("auto", items, answers)}
    lenient = [Answer(c, bool(c), a.content, a.error, a.seconds) for a in answers for c in [a.calls or lenient_parse(a.content)]]
    results["unconstrained-lenient"] = {"auto": score("auto", items, lenient)}
    return "capibara6.tools.formats.HermesFormat"


def latency_ratio(ours: list[float | None], theirs: list[float | None]) -> float | None:
    """Mean capibara6 latency over mean anchor latency, on the prompts both answered without error."""
    pairs = [(a, b) for a, b in zip(ours, theirs) if a is not None and b is not None]
    return round(sum(a for a, _ in pairs) / sum(b for _, b in pairs), 3) if pairs else None


FIELDS = [("n", "n"), ("valid_call_rate", "valid"), ("schema_valid_rate", "schema"), ("expected_tool_rate", "expected"),
          ("no_call_accuracy", "no-call"), ("missed", "missed"), ("wrong", "wrong"), ("calls_schema_valid", "calls ok"),
          ("errors", "errors"), ("mean_s", "mean s")]


def table(results: dict[str, Any]) -> str:
    head = f"{'side':22} {'mode':9}" + "".join(f"{label:>9}" for _, label in FIELDS)
    lines = [head, "-" * len(head)]
    for side, modes in results.items():
        for mode, m in modes.items():
            lines.append(f"{side:22} {mode:9}" + "".join(f"{cell(key, m.get(key)):>9}" for key, _ in FIELDS))
    return "\n".join(lines)


def cell(key: str, v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.0%}" if key.endswith(("rate", "accuracy", "valid")) else str(v)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-path", help="the GGUF (default: the registry entry --model-id in --config)")
    ap.add_argument("--model-id", default=MODEL_ID, help="registry entry to resolve the GGUF from")
    ap.add_argument("--config", default=str(ROOT / "models.yaml"), help="registry to resolve --model-id in")
    ap.add_argument("--max-tokens", type=int, default=150)
    ap.add_argument("--sides", default=",".join(SIDES), help="comma list of " + ", ".join(SIDES))
    ap.add_argument("--modes", default=",".join(MODES), help="comma list of " + ", ".join(MODES))
    ap.add_argument("--limit", type=int, default=0, help="first N call prompts and N//2 (at least 1) no-call prompts (0: all)")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    ap.add_argument("--details", action="store_true", help="print every answer to stderr")
    args = ap.parse_args()

    sides = [s for s in args.sides.split(",") if s]
    modes = [m for m in args.modes.split(",") if m]
    if bad := [s for s in sides if s not in SIDES] + [m for m in modes if m not in MODES]:
        ap.error(f"unknown side or mode: {', '.join(bad)}")
    items = PROMPTS
    if args.limit:
        items = [p for p in PROMPTS if p[1]][: args.limit] + [p for p in PROMPTS if not p[1]][: max(args.limit // 2, 1)]
    gguf = resolve_gguf(args)
    print(f"model {gguf} ({gguf.stat().st_size:,} bytes), {len(items)} prompts, max_tokens {args.max_tokens}, "
          f"greedy, n_threads 1", file=sys.stderr)

    results: dict[str, Any] = {}
    latencies: dict[str, dict[str, list[float | None]]] = {}
    parser = ""
    with tempfile.TemporaryDirectory(prefix="eval_tools-") as tmp_dir:
        tmp = Path(tmp_dir)
        if "capibara6" in sides or "unconstrained" in sides:
            server = start_capibara6(gguf, tmp)
            try:
                server.wait_ready()
                if "capibara6" in sides:
                    run_side("capibara6", server, modes, items, args, results, latencies)
                if "unconstrained" in sides:
                    parser = run_unconstrained(server, gguf, items, args, results)
            finally:
                server.stop()
        if "anchor" in sides:
            server = start_anchor(gguf, tmp)
            try:
                server.wait_ready()
                run_side("anchor", server, modes, items, args, results, latencies)
            finally:
                server.stop()

    ratio = {m: latency_ratio(latencies["capibara6"][m], latencies["anchor"][m])
             for m in modes if m in latencies.get("capibara6", {}) and m in latencies.get("anchor", {})}
    print(table(results))
    print("latency capibara6/anchor: " + ", ".join(f"{m} {'-' if r is None else f'{r:.2f}x'}" for m, r in ratio.items()))
    if parser:
        print(f"unconstrained: parsed with {parser}")
    for side, per_mode in results.items():
        for mode, m in per_mode.items():
            if m.get("first_error"):
                print(f"{side}/{mode}: {m['errors']} errors, first: {m['first_error']}")
    print(json.dumps({"model": gguf.name, "model_bytes": gguf.stat().st_size, "prompts": len(items),
                      "max_tokens": args.max_tokens, "results": results, "latency_ratio": ratio,
                      "unconstrained_parser": parser or None}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
