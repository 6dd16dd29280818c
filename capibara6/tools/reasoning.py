"""`<think>...</think>` -> reasoning_content and content. STUB: interface only."""

from __future__ import annotations


def split_reasoning(text: str, starts_thinking: bool = False) -> tuple[str | None, str]:
    """(reasoning_content, content) of a whole answer; `starts_thinking`: the prompt already
    opened `<think>` (the answer starts inside it)."""
    raise NotImplementedError


class ReasoningSplitter:
    """The streaming twin of split_reasoning: agrees with it for every chunking."""

    def __init__(self, starts_thinking: bool = False) -> None:
        self.starts_thinking = starts_thinking

    def feed(self, text: str) -> tuple[str, str]:
        """(reasoning delta, content delta); a possible partial tag is held back."""
        raise NotImplementedError

    def finish(self) -> tuple[str, str]:
        raise NotImplementedError


def template_thinks(chat_template: str | None) -> bool:
    """The template uses `<think>`."""
    return bool(chat_template) and "<think>" in (chat_template or "")
