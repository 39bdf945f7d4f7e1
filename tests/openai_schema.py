"""Validate replies against OpenAI's own JSON schemas (tests/specs, taken from OpenAI's OpenAPI document)."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import jsonschema

SPEC_PATH = Path(__file__).parent / "specs" / "openai-chat-completions.schemas.json"


@cache
def _components() -> dict:
    return json.loads(SPEC_PATH.read_text())["components"]


def validate(instance: object, schema_name: str) -> None:
    """Raise jsonschema.ValidationError unless `instance` matches components.schemas[schema_name]."""
    schema = {"$ref": f"#/components/schemas/{schema_name}", "components": _components()}
    jsonschema.Draft202012Validator(schema).validate(instance)
