"""Turn an expert's free-text answer into a key that can be compared between experts.

In order of preference:
1. an explicit marker: "answer is (B)", "Answer: 42", "#### 17" -> that letter or number;
2. a leading option letter: "B", "(B) Paris", "B. Paris" -> "B";
3. the last number in the text: "7 + 5 = 12" -> "12" (thousands separators dropped, 12.0 -> 12);
4. the first non-empty line, lower-cased, without punctuation or articles.
Empty text gives None (nothing to vote with).
"""

from __future__ import annotations

import re
import unicodedata

_NUM = r"[-+]?\d[\d,]*(?:\.\d+)?"
# "answer" in any case; an option letter upper-case (or parenthesised), so "answer is a cat" is no "A"
_MARKER = re.compile(
    r"(?i:answer\s*(?:is|:)|####)\s*[:=]?\s*(?:\(([A-Ea-e])\)|([A-E])(?![\w])|(" + _NUM + "))"
)
_LEADING_LETTER = re.compile(r"^\s*\(?([A-E])(?:\)|\.|:|\s*$)")
_NUMBER = re.compile(_NUM)
_ARTICLES = {"a", "an", "the"}


def normalise_number(raw: str) -> str:
    """'1,234.50' -> '1234.5'; '+7' -> '7'; '12.0' -> '12'."""
    s = raw.replace(",", "").lstrip("+")
    if "." in s:
        s = s.rstrip("0").rstrip(".")
    if s in ("-0", ""):
        s = "0"
    return s


def normalise_text(text: str) -> str | None:
    """First non-empty line, lower-case, no punctuation, no articles, single spaces."""
    for line in text.splitlines():
        folded = unicodedata.normalize("NFKC", line).lower()
        words = re.sub(r"[^\w\s]", " ", folded).split()
        words = [w for w in words if w not in _ARTICLES]
        if words:
            return " ".join(words)[:200]
    return None


def extract_answer(text: str) -> str | None:
    """The comparable key of one answer (see the module docstring), or None."""
    if not text or not text.strip():
        return None
    marked = _MARKER.search(text)
    if marked:
        paren, letter, number = marked.groups()
        if paren or letter:
            return (paren or letter).upper()
        return normalise_number(number)
    lead = _LEADING_LETTER.match(text)
    if lead:
        return lead.group(1)
    numbers = _NUMBER.findall(text)
    if numbers:
        return normalise_number(numbers[-1])
    return normalise_text(text)
