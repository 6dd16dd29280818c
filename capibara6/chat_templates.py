"""OpenAI chat messages -> prompt text, per the registry's `chat_format`.

`gemma` is ours: Gemma's turn markup with the system message folded into the first user turn, as
Google's own template does (llama-cpp-python's `gemma` format drops system messages). Other names
use llama-cpp-python's registered formatter of that name; no name renders the GGUF's Jinja template
in our own sandbox (with `tools`, assistant `tool_calls` and `tool` messages, as HF transformers and
llama.cpp's `--jinja` do), so the parent process needs nothing of llama.cpp to template.
Both backends (llama.cpp and native) call this module, so they see identical prompts.
"""

from __future__ import annotations

import datetime
import json
from functools import lru_cache
from typing import Any, Protocol, Sequence

Messages = Sequence[dict[str, Any]]
Tools = Sequence[dict[str, Any]]  # OpenAI tool objects: {"type": "function", "function": {...}}


class Formatter(Protocol):
    """messages (+ tools, for templates that render them) -> (prompt text, stop strings)."""

    def __call__(self, messages: Messages, tools: Tools = ()) -> tuple[str, tuple[str, ...]]: ...


def _text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content)


def format_gemma(messages: Messages, tools: Tools = ()) -> tuple[str, tuple[str, ...]]:
    """Gemma's turns. Tools are never rendered here (Gemma 3's markup has none): a tool request
    on a named format goes through the generic JSON format (capibara6/tools), which has already
    described the tools in a system message."""
    system = "\n\n".join(_text(m["content"]) for m in messages if m["role"] in ("system", "developer"))
    out: list[str] = []
    for m in messages:
        role = m["role"]
        if role in ("system", "developer"):
            continue
        text = _text(m["content"])
        if system and role == "user":
            text, system = f"{system}\n\n{text}", ""
        turn = "model" if role == "assistant" else "user"
        out.append(f"<start_of_turn>{turn}\n{text}<end_of_turn>\n")
    if system:  # only a system message: it becomes the user turn
        out.append(f"<start_of_turn>user\n{system}<end_of_turn>\n")
    out.append("<start_of_turn>model\n")
    return "".join(out), ("<end_of_turn>",)


def _llama_cpp_formatter(name: str) -> Formatter:
    from llama_cpp import llama_chat_format

    fn = getattr(llama_chat_format, "format_" + name.replace("-", "_"), None) or getattr(
        llama_chat_format, "format_" + name.replace("-", ""), None
    )
    if fn is None:
        raise ValueError(f"unknown chat_format {name!r}")

    def fmt(messages: Messages, tools: Tools = ()) -> tuple[str, tuple[str, ...]]:
        res = fn(messages=[{**m, "content": _text(m.get("content"))} for m in messages])
        stop = res.stop if isinstance(res.stop, list) else ([res.stop] if res.stop else [])
        return res.prompt, tuple(stop)

    return fmt


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False, **_: Any) -> str:
    """`tojson` as the GGUF templates expect it (llama.cpp's minja, HF transformers): plain JSON.
    Jinja's own filter HTML-escapes `<`, `>`, `&` and `'`, which would change a tool's schema text."""
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii)


def _raise(message: str) -> None:
    raise ValueError(f"the chat template refused the messages: {message}")


@lru_cache(maxsize=32)
def _compile(template: str) -> Any:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(template)


def render_template(template: str, messages: Messages, tools: Tools = (), bos: str = "", eos: str = "") -> str:
    """The GGUF's `tokenizer.chat_template` (Jinja, as HF transformers renders it) with the
    generation prompt opened; `tools` (OpenAI's tool objects) go in as the template's `tools`.
    Rendered in a sandbox: a template is model data, never trusted code."""
    from jinja2 import TemplateError

    try:
        return str(_compile(template).render(
            messages=[dict(m) for m in messages], tools=list(tools) or None, add_generation_prompt=True,
            bos_token=bos, eos_token=eos,
        ))
    except TemplateError as err:
        raise ValueError(f"the chat template failed: {err}") from None


def template_supports_tools(template: str | None) -> bool:
    """The template renders `tools` itself (Qwen2.5, Hermes, Llama 3.1, ...)."""
    return bool(template) and "tools" in str(template)


def jinja_formatter(template: str, bos: str, eos: str) -> Formatter:
    """The GGUF's own `tokenizer.chat_template`. A leading BOS is stripped: tokenize adds it. The
    end-of-turn stop is the EOS token's text (the template's turn end on every model we serve)."""

    def fmt(messages: Messages, tools: Tools = ()) -> tuple[str, tuple[str, ...]]:
        plain = [{**m, "content": _text(m.get("content"))} if m.get("content") is not None else dict(m) for m in messages]
        prompt = render_template(template, plain, tools, bos, eos)
        prompt = prompt[len(bos):] if bos and prompt.startswith(bos) else prompt
        return prompt, ((eos,) if eos else ())

    return fmt


def get_formatter(name: str) -> Formatter:
    if name == "gemma":
        return format_gemma
    return _llama_cpp_formatter(name)
