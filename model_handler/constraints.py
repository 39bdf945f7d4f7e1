"""What a request's output must match: the constraint the HTTP side sends and the engine compiles.

Plain data with no torch and no grammar library in it, so it crosses the seam inside `SamplingParams`. The HTTP
side builds it from `response_format`, `tools`/`tool_choice` or TGI's `grammar`; the engine compiles it with the
model's own tokenizer (xgrammar), off the step loop, once per distinct constraint.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class ConstraintKind(enum.Enum):
    """What `Constraint.value` holds. Every JSON grammar allows at most a bounded run of whitespace between
    tokens; the output ends with the model's EOS, which the grammar allows only where the value is complete."""

    JSON_SCHEMA = "json_schema"
    """`value`: a JSON schema, as JSON text; the whole output is one JSON value that validates against it.
    Keywords the grammar cannot enforce (`uniqueItems`, `contains`, `not`, `if`/`then`/`else`, dependencies,
    `unevaluated*`, `multipleOf` on non-integers, `allOf` of several schemas, `pattern` or `format` together
    with a length) are refused by name rather than silently dropped."""
    JSON_OBJECT = "json_object"
    """Any JSON object (`value` unused): OpenAI's `response_format: {"type": "json_object"}`."""
    REGEX = "regex"
    """`value`: a regular expression the whole output matches (TGI's `{"type": "regex"}`)."""
    STRUCTURAL_TAG = "structural_tag"
    """`value`: an xgrammar 0.2.9 structural tag, as JSON text: the whole object `{"type": "structural_tag",
    "format": {...}}`, free text with tagged parts, each held to its own format (tool calls opened by a trigger
    such as `<tool_call>`, an answer after a `</think>` block). Its `json_schema` parts follow JSON_SCHEMA's
    rules and get the whitespace bound unless they set `max_whitespace_cnt` themselves."""


@dataclass(frozen=True, slots=True)
class Constraint:
    """One output constraint; frozen and hashable, so equal constraints share one compiled grammar."""

    kind: ConstraintKind
    value: str = ""
    strict: bool = True
    """JSON schemas: objects take only the properties the schema lists unless it allows more (OpenAI's
    `strict: true`); False follows JSON Schema's own default, where unlisted properties are allowed."""
