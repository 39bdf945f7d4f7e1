"""JSON schemas made safe for xgrammar 0.2.9 before compiling: keywords it accepts but does not enforce are
refused by name (rather than compiled into a looser grammar whose output might not validate), and length-bounded
strings, which its grammar lets hold raw control characters (invalid JSON), are rewritten as patterns."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

_UNENFORCED = {
    "uniqueItems": "uniqueness of array items",
    "contains": "'contains' on arrays",
    "minContains": "'contains' on arrays",
    "maxContains": "'contains' on arrays",
    "dependentRequired": "dependencies between properties",
    "dependentSchemas": "dependencies between properties",
    "dependencies": "dependencies between properties",
    "not": "negated schemas",
    "if": "conditional schemas",
    "then": "conditional schemas",
    "else": "conditional schemas",
    "unevaluatedProperties": "unevaluated properties",
    "unevaluatedItems": "unevaluated items",
}
_NO_OP = {"uniqueItems": False, "unevaluatedProperties": True, "unevaluatedItems": True}
"""Values with which these keywords constrain nothing, so they are fine."""
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_VALUES = ("items", "additionalProperties", "propertyNames")


def find_unsupported_keyword(schema: Any) -> str | None:
    """A message naming the first keyword the grammar cannot enforce and where it is, or None."""
    for path, node in _subschemas(schema, ""):
        where = path or "/"
        for keyword, what in _UNENFORCED.items():
            if keyword in node and node[keyword] is not _NO_OP.get(keyword, object()):
                return f"keyword '{keyword}' at {where} is not supported ({what} cannot be enforced)"
        if "multipleOf" in node and not _is_integer_only(node.get("type")):
            return f"keyword 'multipleOf' at {where} is supported on integers only"
        for keyword in ("pattern", "format"):
            if keyword in node and ("minLength" in node or "maxLength" in node):
                return f"keyword '{keyword}' at {where} is not supported together with 'minLength' or 'maxLength'"
        if isinstance(node.get("allOf"), list) and len(node["allOf"]) > 1:
            return f"keyword 'allOf' at {where} is supported with one schema only"
    return None


def with_string_lengths_as_patterns(schema: Any) -> Any:
    """A copy of the schema where `minLength`/`maxLength` (strings without a pattern or format) become the
    pattern `^.{min,max}$`: xgrammar compiles patterns into JSON-string grammars that keep control characters
    out, but lengths into a character class that lets them in. The pattern only narrows what may be written
    (no escapes, no line breaks): every value it allows satisfies the lengths."""
    schema = json.loads(json.dumps(schema))
    for _, node in _subschemas(schema, ""):
        if ("minLength" in node or "maxLength" in node) and "pattern" not in node and "format" not in node:
            low, high = node.pop("minLength", 0), node.pop("maxLength", "")
            node["pattern"] = f"^.{{{low},{high}}}$"
    return schema


def _is_integer_only(types: Any) -> bool:
    kinds = types if isinstance(types, list) else [types]
    return "integer" in kinds and "number" not in kinds


def _subschemas(node: Any, path: str) -> Iterator[tuple[str, dict]]:
    """Every schema object in `node` with its JSON pointer, `node` first (values of keywords such as `const`,
    `enum` or `default` are data, not schemas, and are not entered)."""
    if not isinstance(node, dict):
        return
    yield path, node
    for keyword in _SCHEMA_MAPS:
        children = node.get(keyword)
        if isinstance(children, dict):
            for name, child in children.items():
                yield from _subschemas(child, f"{path}/{keyword}/{name}")
    for keyword in _SCHEMA_LISTS + _SCHEMA_VALUES:
        children = node.get(keyword)
        if isinstance(children, list):  # also draft-7's tuple `items`
            for index, child in enumerate(children):
                yield from _subschemas(child, f"{path}/{keyword}/{index}")
        else:
            yield from _subschemas(children, f"{path}/{keyword}")
