"""Schemas with keywords xgrammar would drop are refused naming the keyword; the rest compile untouched."""

from __future__ import annotations

import json

import jsonschema
import pytest

from model_handler.constraints import Constraint, ConstraintKind
from model_handler.grammar_compiler import GrammarError
from model_handler.json_schema_support import find_unsupported_keyword, with_string_lengths_as_patterns

# (schema, an instance it forbids that xgrammar's grammar for it would still produce, the refused keyword)
LOOSENED = [
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "[1, 1]", "uniqueItems"),
    ({"type": "array", "items": {"type": "integer"}, "contains": {"const": 5}}, "[1]", "contains"),
    ({"type": "number", "multipleOf": 3}, "4", "multipleOf"),
    ({"type": "string", "pattern": "a+", "maxLength": 2}, '"aaa"', "pattern"),
    ({"type": "string", "format": "email", "maxLength": 5}, '"abcdef@x.com"', "format"),
    ({"allOf": [{"type": "integer"}, {"minimum": 3}]}, "1", "allOf"),
    ({"not": {"type": "integer"}}, "1", "not"),
    ({"if": {"type": "integer"}, "then": {"minimum": 3}}, "1", "if"),
    (
        {"type": "object", "properties": {"a": {"type": "integer"}}, "dependentRequired": {"a": ["b"]}},
        '{"a": 1}',
        "dependentRequired",
    ),
    (
        {"type": "object", "properties": {"a": {"type": "integer"}}, "unevaluatedProperties": False},
        '{"b": 1}',
        "unevaluatedProperties",
    ),
]


def xgrammar_accepts(model_dir, schema, instance: str) -> bool:
    """xgrammar's own grammar for the schema, compiled as is, takes `instance` whole."""
    import xgrammar as xgr
    from transformers import AutoTokenizer

    info = xgr.TokenizerInfo.from_huggingface(AutoTokenizer.from_pretrained(model_dir), vocab_size=512)
    compiled = xgr.GrammarCompiler(info, cache_enabled=False).compile_json_schema(json.dumps(schema), strict_mode=False)
    matcher = xgr.GrammarMatcher(compiled)
    return matcher.accept_string(instance) and matcher.is_completed()


@pytest.mark.parametrize(("schema", "instance", "keyword"), LOOSENED)
def test_each_refused_keyword_is_one_xgrammar_would_drop(test_model_dir, schema, instance, keyword):
    """Compiled anyway, the grammar accepts an instance the schema forbids: why the keyword is refused."""
    assert xgrammar_accepts(test_model_dir, schema, instance)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(json.loads(instance), schema)
    assert f"keyword '{keyword}' at /" in find_unsupported_keyword(schema)


def test_the_message_points_at_the_nested_schema():
    schema = {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": {"type": "array", "uniqueItems": True}}},
        "$defs": {"x": {"anyOf": [{"type": "string"}, {"not": {"const": 1}}]}},
    }
    assert find_unsupported_keyword(schema).startswith("keyword 'uniqueItems' at /properties/tags/items is not")
    del schema["properties"]
    assert find_unsupported_keyword(schema).startswith("keyword 'not' at /$defs/x/anyOf/1 is not supported")


@pytest.mark.parametrize(
    "schema",
    [
        # what pydantic writes: $defs, $ref under a one-schema allOf, Optional as anyOf with null, titles, defaults
        {
            "$defs": {"Pet": {"properties": {"name": {"title": "Name", "type": "string"}}, "type": "object"}},
            "properties": {
                "pet": {"allOf": [{"$ref": "#/$defs/Pet"}], "default": None},
                "age": {"anyOf": [{"type": "integer", "multipleOf": 2}, {"type": "null"}], "title": "Age"},
                "ids": {"type": "array", "items": {"type": "integer"}, "uniqueItems": False},
            },
            "required": ["pet"],
            "title": "Owner",
            "type": "object",
        },
        # keywords' names used as property names, and as data
        {"type": "object", "properties": {"not": {"type": "string"}, "if": {"const": {"not": 1}}}},
        True,
    ],
)
def test_supported_schemas_pass(schema):
    assert find_unsupported_keyword(schema) is None


def test_the_compiler_refuses_them_in_schemas_and_structural_tags(grammar_compiler):
    schema = {"type": "array", "uniqueItems": True}
    with pytest.raises(GrammarError, match="^the JSON schema is invalid: keyword 'uniqueItems' at / is not supp"):
        grammar_compiler.submit(Constraint(ConstraintKind.JSON_SCHEMA, json.dumps(schema))).result(30)
    tag = {
        "type": "structural_tag",
        "format": {
            "type": "tag",
            "begin": "<a>",
            "content": {"type": "json_schema", "json_schema": schema},
            "end": "</a>",
        },
    }
    with pytest.raises(GrammarError, match="^the structural tag is invalid: keyword 'uniqueItems' at / is not supp"):
        grammar_compiler.submit(Constraint(ConstraintKind.STRUCTURAL_TAG, json.dumps(tag))).result(30)


def test_length_bounded_strings_become_patterns_that_keep_control_characters_out(test_model_dir):
    schema = {"type": "object", "properties": {"s": {"type": "string", "minLength": 1, "maxLength": 3}}}
    raw_control = '{"s": "a\x02"}'  # not JSON: control characters must be escaped in strings
    with pytest.raises(json.JSONDecodeError):
        json.loads(raw_control)
    assert xgrammar_accepts(test_model_dir, schema, raw_control)  # xgrammar 0.2.9's grammar for lengths lets it in
    rewritten = with_string_lengths_as_patterns(schema)
    assert rewritten["properties"]["s"] == {"type": "string", "pattern": "^.{1,3}$"}
    assert schema["properties"]["s"]["maxLength"] == 3  # the caller's schema is left as it was
    assert not xgrammar_accepts(test_model_dir, rewritten, raw_control)
    assert xgrammar_accepts(test_model_dir, rewritten, '{"s": "abc"}')
    assert not xgrammar_accepts(test_model_dir, rewritten, '{"s": "abcd"}')
    assert not xgrammar_accepts(test_model_dir, rewritten, '{"s": ""}')
    only_max = with_string_lengths_as_patterns({"type": "string", "maxLength": 4})
    assert only_max == {"type": "string", "pattern": "^.{0,4}$"}
