"""response_format -> a GBNF grammar that constrains sampling (llama.cpp's grammar engine)."""

from __future__ import annotations

import json

from ..errors import InvalidRequest
from .protocol import ResponseFormat


def response_format_grammar(fmt: ResponseFormat | None) -> str | None:
    if fmt is None or fmt.type == "text":
        return None
    from llama_cpp import llama_grammar

    if fmt.type == "json_object":
        return llama_grammar.JSON_GBNF
    if fmt.json_schema is None or not fmt.json_schema.schema_:
        raise InvalidRequest("response_format json_schema needs json_schema.schema.", param="response_format")
    try:
        return llama_grammar.json_schema_to_gbnf(json.dumps(fmt.json_schema.schema_))
    except Exception as err:  # the converter raises assorted errors on schemas it cannot express
        raise InvalidRequest(f"Unsupported JSON schema: {err}", param="response_format") from None
