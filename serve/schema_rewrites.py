"""JSON schemas as the grammar compiler should see them: the same documents, with what JSON Schema leaves implicit
written out where xgrammar reads it otherwise.

In a structural tag xgrammar reads every object schema strictly (no properties beyond the listed ones); a request
that is not strict (OpenAI's `strict: false`, JSON Schema's own default) says so explicitly here. (The engine
prepares every schema further before compiling: model_handler/json_schema_support.py.)
"""

from __future__ import annotations

from typing import Any

_SCHEMA_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems")
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_VALUES = ("items", "additionalItems", "additionalProperties", "not", "if", "then", "else", "contains")


def grammar_schema(schema: Any, strict: bool) -> Any:
    """A copy of `schema` where, unless `strict`, every object schema that lists properties and says nothing of
    others allows them (the original is left as it is)."""
    if strict or not isinstance(schema, dict):
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
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = True
    return out
