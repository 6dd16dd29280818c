"""`<think>...</think>` -> reasoning_content and content, as llama-server and vLLM split them.

The rule, the same for the whole answer and the stream: an answer that opens with `<think>`
(after optional whitespace), or any answer when the prompt already opened it (`starts_thinking`:
templates such as DeepSeek-R1's and Qwen3's end the generation prompt with `<think>\\n`), thinks
until `</think>`. The reasoning is that text without its surrounding whitespace (None when empty);
the content is what follows the closing tag, without its leading whitespace. An answer cut
before `</think>` is all reasoning. An answer that does not think is all content, untouched.
"""

from __future__ import annotations

from enum import Enum

from .stream import held_back

OPEN = "<think>"
CLOSE = "</think>"


def split_reasoning(text: str, starts_thinking: bool = False) -> tuple[str | None, str]:
    """(reasoning_content, content) of a whole answer."""
    if starts_thinking:
        body = text
    elif text.lstrip().startswith(OPEN):
        body = text.lstrip()[len(OPEN) :]
    else:
        return None, text
    end = body.find(CLOSE)
    if end < 0:
        return body.strip() or None, ""
    return body[:end].strip() or None, body[end + len(CLOSE) :].lstrip()


def answer_start(text: str, starts_thinking: bool = False) -> int | None:
    """Where the answer proper starts in `text` (after a leading thinking block, as
    split_reasoning reads it): 0 when it does not think, None while still thinking."""
    if not starts_thinking and not text.lstrip().startswith(OPEN):
        return 0
    end = text.find(CLOSE)
    return None if end < 0 else end + len(CLOSE)


class _S(Enum):
    START = 1  # not yet known whether the answer thinks
    THINK = 2
    AFTER = 3  # after </think>: whitespace dropped
    CONTENT = 4


class ReasoningSplitter:
    """The streaming twin of split_reasoning: the deltas concatenated equal its result (None as
    "") for every chunking. Text that may be a partial tag, and whitespace that may turn out to
    end the reasoning, is held back until decided."""

    def __init__(self, starts_thinking: bool = False) -> None:
        self.buf = ""
        self.pos = 0
        self.state = _S.THINK if starts_thinking else _S.START
        self.began = False  # inside the thinking: its leading whitespace is behind us

    def feed(self, text: str) -> tuple[str, str]:
        """(reasoning delta, content delta)."""
        self.buf += text
        return self._run(final=False)

    def finish(self) -> tuple[str, str]:
        return self._run(final=True)

    def _run(self, final: bool) -> tuple[str, str]:
        reasoning: list[str] = []
        content: list[str] = []
        while True:
            moved = self._step(final, reasoning, content)
            if not moved:
                return "".join(reasoning), "".join(content)

    def _step(self, final: bool, reasoning: list[str], content: list[str]) -> bool:
        s = self.buf[self.pos :]
        if self.state is _S.START:
            head = s.lstrip()
            if head.startswith(OPEN):
                self.pos += len(s) - len(head) + len(OPEN)
                self.state = _S.THINK
                return True
            if head and OPEN.startswith(head) and not final:
                return False
            if not head and not final:
                return False
            self.state = _S.CONTENT
            return True
        if self.state is _S.THINK:
            if not self.began:
                head = s.lstrip()
                self.pos += len(s) - len(head)
                self.began = bool(head)
                return self.began
            end = s.find(CLOSE)
            if end >= 0:
                reasoning.append(s[:end].rstrip())
                self.pos += end + len(CLOSE)
                self.state = _S.AFTER
                return True
            keep = len(s) - len(s.rstrip()) if final else held_back(s, CLOSE)
            reasoning.append(s[: len(s) - keep])
            self.pos += len(s) - keep
            return False
        if self.state is _S.AFTER:
            head = s.lstrip()
            self.pos += len(s) - len(head)
            if head:
                self.state = _S.CONTENT
                return True
            return False
        content.append(s)
        self.pos = len(self.buf)
        return False


def template_thinks(chat_template: str | None) -> bool:
    """The template uses `<think>` (it renders or opens a thinking block)."""
    return bool(chat_template) and OPEN in (chat_template or "")
