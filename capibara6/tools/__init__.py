"""Tool calling and reasoning, pure of HTTP and backends: request checking (spec), JSON Schema to
GBNF (schema_grammar), per-template call formats with whole and streaming parsers (formats), and
`<think>` splitting (reasoning). capibara6/tool_use.py wires them into a generation."""
