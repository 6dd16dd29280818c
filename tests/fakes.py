"""Test seams for the backend contract (capibara6/backends/base.py): a base for scripted backends,
and `prepared()` to hand a real backend a prompt the way the service does."""

from __future__ import annotations

from typing import Any, Sequence

from capibara6.serving import to_prompt
from capibara6.types import ChatPrompt, Prepared, Prompt, TextPrompt


class FakeBackendBase:
    """The instance side of the contract with harmless defaults; a fake overrides `generate`."""

    model_id = "fake"
    n_ctx = 512

    def prepare(self, prompt: Prompt) -> Prepared:
        if isinstance(prompt, ChatPrompt):
            text = " ".join(str(m.get("content") or "") for m in prompt.messages) or "x"
        elif isinstance(prompt, TextPrompt):
            text = prompt.text
        else:
            return Prepared(prompt, prompt.ids, len(prompt.ids))
        ids = (1,) * max(1, len(text.split()))
        return Prepared(prompt, ids, len(ids), (), text)

    def detokenize(self, ids: Sequence[int]) -> str:
        return " ".join("t" for _ in ids)

    def set_threads(self, n_threads: int) -> None:
        return None

    def current_threads(self) -> int | None:
        return None

    def kv_cache_bytes(self) -> int:
        return 0

    def memory_bytes(self) -> int:
        return 0

    def close(self) -> None:
        return None


def prepared(backend: Any, source: str | list[int] | list[dict[str, Any]]) -> Prepared:
    """A real backend's Prepared for text, token ids or chat messages (what the service builds)."""
    return backend.prepare(to_prompt(source))  # type: ignore[no-any-return]


def chat_text(backend: Any, messages: list[dict[str, Any]]) -> tuple[str, tuple[str, ...]]:
    """(templated prompt text, the template's stop strings), as the backend prepares a chat."""
    p = backend.prepare(ChatPrompt(tuple(messages)))
    return p.text or "", p.stops
