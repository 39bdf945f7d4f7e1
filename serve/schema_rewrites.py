"""JSON schemas as the grammar compiler should see them: the same documents they validate, written so that
xgrammar 0.2.9 produces exactly the JSON they describe.

- Lax objects: in a structural tag xgrammar reads every object schema strictly (no unlisted properties); a
  request that is not strict (OpenAI's `strict: false`, JSON Schema's own default) says so explicitly here.
- Bounded strings: for a string with `minLength`/`maxLength` (and no pattern or format), xgrammar allows raw
  control characters (U+0000-U+001F) between the quotes, which is not JSON; a pattern of the same length that
  excludes them (and quotes and backslashes, so no escape is needed) takes its place.
"""

from __future__ import annotations

from typing import Any

_SCHEMA_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems")
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_VALUES = ("items", "additionalItems", "additionalProperties", "not", "if", "then", "else", "contains")
_PLAIN_CHARACTER = '[^\\x00-\\x1f"\\\\]'


def grammar_schema(schema: Any, strict: bool) -> Any:
    """A rewritten copy of `schema` (the original is left as it is)."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [grammar_schema(s, strict) for s in out[key]]
    for key in _SCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: grammar_schema(s, strict) for name, s in out[key].items()}
    for key in _SCHEMA_VALUES:
        if isinstance(out.get(key), dict):
            out[key] = grammar_schema(out[key], strict)
    if not strict and "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = True
    if _is_bounded_plain_string(out):
        low, high = out.pop("minLength", 0), out.pop("maxLength", None)
        out["pattern"] = f"^{_PLAIN_CHARACTER}{{{low},{'' if high is None else high}}}$"
    return out


def _is_bounded_plain_string(schema: dict) -> bool:
    if schema.get("type") != "string" or not ("minLength" in schema or "maxLength" in schema):
        return False
    if any(key in schema for key in ("pattern", "format", "enum", "const")):
        return False
    return all(isinstance(schema.get(key, 0), int) for key in ("minLength", "maxLength"))
