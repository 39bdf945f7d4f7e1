"""Compiling constraints with the test model's tokenizer: one compile per distinct constraint, clear errors, the
whitespace bound, a padded vocabulary, and xgrammar missing."""

from __future__ import annotations

import json
import shutil
import sys
import threading
import time

import pytest
import torch

from model_handler import grammar_compiler as compiler_module
from model_handler.constraints import Constraint, ConstraintKind
from model_handler.grammar_compiler import MAX_JSON_WHITESPACE, GrammarCompiler, GrammarError, xgrammar_version
from model_handler.grammar_matcher import RequestGrammar

SCHEMA = Constraint(
    ConstraintKind.JSON_SCHEMA, json.dumps({"type": "object", "properties": {"a": {"type": "integer"}}})
)


def accepts(compiled, text: str) -> bool:
    """The grammar takes `text` whole and may end there."""
    import xgrammar as xgr

    matcher = xgr.GrammarMatcher(compiled)
    return matcher.accept_string(text) and matcher.is_completed()


def test_equal_constraints_share_one_compile(grammar_compiler):
    before = grammar_compiler.num_compiles, grammar_compiler.num_cache_hits
    first = grammar_compiler.submit(Constraint(ConstraintKind.REGEX, "[0-9]{3}-only-once"))
    second = grammar_compiler.submit(Constraint(ConstraintKind.REGEX, "[0-9]{3}-only-once"))
    assert second is first and first.result(30) is second.result(30)
    assert (grammar_compiler.num_compiles, grammar_compiler.num_cache_hits) == (before[0] + 1, before[1] + 1)
    assert grammar_compiler.submit(Constraint(ConstraintKind.REGEX, "[0-9]{3}-only-twice")) is not first


@pytest.mark.parametrize(
    ("constraint", "good", "bad"),
    [
        (SCHEMA, '{"a": 1}', '{"a": "x"}'),
        (Constraint(ConstraintKind.JSON_OBJECT), '{"any": [1, {"b": null}]}', "[1]"),
        (Constraint(ConstraintKind.REGEX, r"[a-z]+@[a-z]+\.com"), "me@ex.com", "me@ex.org"),
    ],
)
def test_each_kind_compiles_to_its_language(grammar_compiler, constraint, good, bad):
    compiled = grammar_compiler.submit(constraint).result(30)
    assert accepts(compiled, good) and not accepts(compiled, bad)


def test_strict_schema_refuses_unlisted_properties_and_lax_allows_them(grammar_compiler):
    strict = grammar_compiler.submit(SCHEMA).result(30)
    lax = grammar_compiler.submit(Constraint(ConstraintKind.JSON_SCHEMA, SCHEMA.value, strict=False)).result(30)
    assert not accepts(strict, '{"a": 1, "b": 2}') and accepts(lax, '{"a": 1, "b": 2}')


def test_json_whitespace_is_bounded(grammar_compiler):
    compiled = grammar_compiler.submit(SCHEMA).result(30)
    assert accepts(compiled, '{\n  "a": 1\n}')
    assert accepts(compiled, '{"a":' + " " * MAX_JSON_WHITESPACE + "1}")
    assert not accepts(compiled, '{"a":' + " " * (MAX_JSON_WHITESPACE + 1) + "1}")
    anything = grammar_compiler.submit(Constraint(ConstraintKind.JSON_OBJECT)).result(30)
    assert not accepts(anything, "{" + "\n" * (MAX_JSON_WHITESPACE + 1) + "}")


def tool_call_tag(max_whitespace: int | None = None) -> dict:
    content = {"type": "json_schema", "json_schema": {"type": "object", "properties": {"x": {"type": "integer"}}}}
    if max_whitespace is not None:
        content["max_whitespace_cnt"] = max_whitespace
    return {
        "type": "structural_tag",
        "format": {
            "type": "triggered_tags",
            "triggers": ["<tool_call>"],
            "tags": [{"type": "tag", "begin": "<tool_call>", "content": content, "end": "</tool_call>"}],
        },
    }


def test_structural_tag_is_free_text_until_its_trigger_then_json_with_bounded_whitespace(grammar_compiler):
    compiled = grammar_compiler.submit(Constraint(ConstraintKind.STRUCTURAL_TAG, json.dumps(tool_call_tag()))).result(
        30
    )
    assert accepts(compiled, 'Let me see. <tool_call>{"x": 1}</tool_call> Done.')
    assert not accepts(compiled, 'Let me see. <tool_call>{"x": "one"}</tool_call>')
    assert not accepts(compiled, '<tool_call>{"x":' + " " * (MAX_JSON_WHITESPACE + 1) + "1}</tool_call>")
    own_bound = Constraint(ConstraintKind.STRUCTURAL_TAG, json.dumps(tool_call_tag(max_whitespace=1)))
    compiled = grammar_compiler.submit(own_bound).result(30)
    assert accepts(compiled, '<tool_call>{"x": 1}</tool_call>')
    assert not accepts(compiled, '<tool_call>{"x":  1}</tool_call>')  # the tag's own bound is kept


def test_structural_tag_parts_are_prepared_like_schemas():
    schema = {"type": "object", "properties": {"s": {"type": "string", "maxLength": 3}}}
    tag = {"type": "json_schema", "json_schema": schema}
    prepared = compiler_module._prepare_tag({"format": {"type": "sequence", "elements": [tag]}})
    assert prepared["format"]["elements"][0] == {
        "type": "json_schema",
        "json_schema": {"type": "object", "properties": {"s": {"type": "string", "pattern": "^.{0,3}$"}}},
        "max_whitespace_cnt": MAX_JSON_WHITESPACE,
    }


@pytest.mark.parametrize(
    ("constraint", "message"),
    [
        (Constraint(ConstraintKind.JSON_SCHEMA, "{not json"), "the JSON schema is invalid: not JSON"),
        (
            Constraint(ConstraintKind.JSON_SCHEMA, '{"type": "strin"}'),
            'the JSON schema is invalid: Unsupported type "strin"',
        ),
        (
            Constraint(ConstraintKind.REGEX, "(ab"),
            "the regex is invalid: Regex parsing error at position 4: The parenthesis is not closed",
        ),
        (Constraint(ConstraintKind.STRUCTURAL_TAG, '{"type": "structural_tag"}'), "the structural tag is invalid: "),
        (Constraint(ConstraintKind.STRUCTURAL_TAG, "<tool_call>"), "the structural tag is invalid: not JSON"),
    ],
)
def test_a_constraint_that_does_not_compile_names_the_problem(grammar_compiler, constraint, message):
    future = grammar_compiler.submit(constraint)
    with pytest.raises(GrammarError) as caught:
        future.result(30)
    assert str(caught.value).startswith(message)
    assert ".cc:" not in str(caught.value) and "Check failed" not in str(caught.value)  # no C++ log prefix


def test_compile_errors_are_cached_too(grammar_compiler):
    bad = Constraint(ConstraintKind.REGEX, "([a-z]")
    assert grammar_compiler.submit(bad) is grammar_compiler.submit(bad)


def test_on_ready_is_called_when_a_compile_ends(test_model_dir):
    compiler = GrammarCompiler(test_model_dir, 512, [2])
    called = threading.Event()
    compiler.on_ready = called.set
    try:
        compiler.submit(SCHEMA).result(30)
        assert called.wait(5)
    finally:
        compiler.shutdown()


def test_least_recently_used_grammars_leave_the_cache(test_model_dir, monkeypatch):
    monkeypatch.setattr(compiler_module, "MAX_CACHED_GRAMMARS", 2)
    compiler = GrammarCompiler(test_model_dir, 512, [2])
    try:
        regexes = [Constraint(ConstraintKind.REGEX, f"[a-z]{{{n}}}") for n in (1, 2, 3)]
        for constraint in regexes:
            compiler.submit(constraint).result(30)
        compiler.submit(regexes[0]).result(30)  # evicted by the third: compiled again
        assert (compiler.num_compiles, compiler.num_cache_hits) == (4, 0)
        compiler.submit(regexes[0]).result(30)
        assert compiler.num_cache_hits == 1
    finally:
        compiler.shutdown()


def test_ids_past_the_tokenizer_are_never_allowed(test_model_dir):
    """An LM head wider than the tokenizer (padded): the mask covers the logits' whole width."""
    compiler = GrammarCompiler(test_model_dir, 600, [2])
    try:
        grammar = RequestGrammar(compiler.submit(Constraint(ConstraintKind.REGEX, "[a-z ]+")).result(30))
    finally:
        compiler.shutdown()
    bitmask = torch.zeros((1, (600 + 31) // 32), dtype=torch.int32)
    grammar.fill(bitmask, 0)
    allowed = [t for t in range(600) if bitmask[0, t // 32].item() >> (t % 32) & 1]
    assert allowed and max(allowed) < 512


def test_xgrammar_missing_refuses_every_constraint_with_a_clear_message(test_model_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "xgrammar", None)  # what `import xgrammar` meets in an image without it
    assert xgrammar_version() == ""
    compiler = GrammarCompiler(test_model_dir, 512, [2])
    try:
        with pytest.raises(GrammarError, match="constrained decoding is unavailable: the engine's image lacks the"):
            compiler.submit(SCHEMA).result(30)
    finally:
        compiler.shutdown()


def test_a_model_folder_without_a_tokenizer_refuses_constraints(test_model_dir, tmp_path):
    shutil.copy(test_model_dir / "config.json", tmp_path / "config.json")
    compiler = GrammarCompiler(tmp_path, 512, [2])
    try:
        with pytest.raises(GrammarError, match="the model's tokenizer could not be loaded"):
            compiler.submit(SCHEMA).result(30)
    finally:
        compiler.shutdown()


def test_version_names_the_installed_xgrammar():
    assert xgrammar_version() == "xgrammar 0.2.9"


def test_prepare_loads_xgrammar_and_the_tokenizer_ahead_of_the_first_request(test_model_dir, monkeypatch):
    compiler = GrammarCompiler(test_model_dir, 512, [2])
    try:
        compiler.prepare()
        deadline = time.monotonic() + 30
        while compiler._compiler is None:
            assert time.monotonic() < deadline, "prepare() built no compiler"
            time.sleep(0.01)
        assert compiler.num_compiles == 0
    finally:
        compiler.shutdown()
    monkeypatch.setitem(sys.modules, "xgrammar", None)
    absent = GrammarCompiler(test_model_dir, 512, [2])
    absent.prepare()  # nothing to prepare, and no thread started for it
    assert absent._pool is None
