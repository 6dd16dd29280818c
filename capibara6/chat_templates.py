"""OpenAI chat messages -> prompt text, per the registry's `chat_format`.

`gemma` is ours: Gemma's turn markup with the system message folded into the first user turn, as
Google's own template does (llama-cpp-python's `gemma` format drops system messages). Other names
use llama-cpp-python's registered formatter of that name; no name uses the GGUF's Jinja template.
Both backends (llama.cpp and native) call this module, so they see identical prompts.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence, cast

Messages = Sequence[dict[str, Any]]
Formatter = Callable[[Messages], tuple[str, tuple[str, ...]]]


def _text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content)


def format_gemma(messages: Messages) -> tuple[str, tuple[str, ...]]:
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

    def fmt(messages: Messages) -> tuple[str, tuple[str, ...]]:
        res = fn(messages=[{**m, "content": _text(m.get("content"))} for m in messages])
        stop = res.stop if isinstance(res.stop, list) else ([res.stop] if res.stop else [])
        return res.prompt, tuple(stop)

    return fmt


def jinja_formatter(template: str, bos: str, eos: str) -> Formatter:
    """The GGUF's own `tokenizer.chat_template`. A leading BOS is stripped: tokenize adds it."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    jf = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos, add_generation_prompt=True)

    def fmt(messages: Messages) -> tuple[str, tuple[str, ...]]:
        res = jf(messages=cast(Any, [{**m, "content": _text(m.get("content"))} for m in messages]))
        prompt = res.prompt[len(bos):] if bos and res.prompt.startswith(bos) else res.prompt
        stop = res.stop if isinstance(res.stop, list) else ([res.stop] if res.stop else [])
        return prompt, tuple(stop)

    return fmt


def get_formatter(name: str) -> Formatter:
    if name == "gemma":
        return format_gemma
    return _llama_cpp_formatter(name)
