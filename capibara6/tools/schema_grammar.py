"""JSON Schema -> GBNF (llama.cpp's grammar syntax): our own converter. STUB: interface only."""

from __future__ import annotations

from typing import Any, Mapping


def schema_to_gbnf(schema: Mapping[str, Any], prefix: str, param: str) -> list[str]:
    """GBNF rules whose start symbol is `prefix`, matching exactly the JSON texts valid under
    `schema` in Python's json.dumps default layout (", " and ": "). Raises ToolError(param=param)
    for every keyword it cannot enforce."""
    raise NotImplementedError
