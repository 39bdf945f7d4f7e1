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
from tests.model_handler.engine_factories import COMPILE_TIMEOUT_S

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
    assert second is first and first.result(COMPILE_TIMEOUT_S) is second.result(COMPILE_TIMEOUT_S)
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
    compiled = grammar_compiler.submit(constraint).result(COMPILE_TIMEOUT_S)
    assert accepts(compiled, good) and not accepts(compiled, bad)


def test_strict_schema_refuses_unlisted_properties_and_lax_allows_them(grammar_compiler):
    strict = grammar_compiler.submit(SCHEMA).result(COMPILE_TIMEOUT_S)
    lax = grammar_compiler.submit(Constraint(ConstraintKind.JSON_SCHEMA, SCHEMA.value, strict=False)).result(
        COMPILE_TIMEOUT_S
    )
    assert not accepts(strict, '{"a": 1, "b": 2}') and accepts(lax, '{"a": 1, "b": 2}')


def test_json_whitespace_is_bounded(grammar_compiler):
    compiled = grammar_compiler.submit(SCHEMA).result(COMPILE_TIMEOUT_S)
    assert accepts(compiled, '{\n  "a": 1\n}')
    assert accepts(compiled, '{"a":' + " " * MAX_JSON_WHITESPACE + "1}")
    assert not accepts(compiled, '{"a":' + " " * (MAX_JSON_WHITESPACE + 1) + "1}")
    anything = grammar_compiler.submit(Constraint(ConstraintKind.JSON_OBJECT)).result(COMPILE_TIMEOUT_S)
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
    compiled = grammar_compiler.submit(own_bound).result(COMPILE_TIMEOUT_S)
    assert accepts(compiled, '<tool_call>{"x": 1}</tool_call>')
    assert not accepts(compiled, '<tool_call>{"x":  1}</tool_call>')  # the tag's own bound is kept


def test_structural_tag_parts_are_checked_like_schemas_and_get_the_whitespace_bound():
    schema = {"type": "object", "properties": {"s": {"type": "string", "maxLength": 3}}}
    tag = {"type": "json_schema", "json_schema": schema}
    prepared = compiler_module._prepare_tag({"format": {"type": "sequence", "elements": [tag]}})
    assert prepared["format"]["elements"][0] == {**tag, "max_whitespace_cnt": MAX_JSON_WHITESPACE}
    with pytest.raises(GrammarError, match="keyword 'not' at /properties/s"):
        compiler_module._prepare_tag({**tag, "json_schema": {"properties": {"s": {"not": {}}}}})


BOUNDED = {"type": "object", "properties": {"s": {"type": "string", "minLength": 1, "maxLength": 3}}, "required": ["s"]}


def test_length_bounded_strings_keep_raw_control_characters_out(grammar_compiler, test_model_dir):
    """xgrammar 0.2.9's own grammar for a length-bounded string lets raw control characters in: not JSON."""
    import xgrammar as xgr
    from transformers import AutoTokenizer

    raw_control, raw_tab = '{"s": "a\x02"}', '{"s": "a\tb"}'
    for text in (raw_control, raw_tab):
        with pytest.raises(json.JSONDecodeError):
            json.loads(text)
    info = xgr.TokenizerInfo.from_huggingface(AutoTokenizer.from_pretrained(test_model_dir), vocab_size=512)
    as_xgrammar_compiles_it = xgr.GrammarCompiler(info, cache_enabled=False).compile_json_schema(json.dumps(BOUNDED))
    assert accepts(as_xgrammar_compiles_it, raw_control) and accepts(as_xgrammar_compiles_it, raw_tab)
    compiled = grammar_compiler.submit(Constraint(ConstraintKind.JSON_SCHEMA, json.dumps(BOUNDED))).result(
        COMPILE_TIMEOUT_S
    )
    assert not accepts(compiled, raw_control) and not accepts(compiled, raw_tab)
    assert accepts(compiled, '{"s": "abc"}') and accepts(compiled, '{"s": "a"}')
    assert not accepts(compiled, '{"s": "abcd"}') and not accepts(compiled, '{"s": ""}')
    tag = {
        "type": "structural_tag",
        "format": {
            "type": "tag",
            "begin": "<a>",
            "content": {"type": "json_schema", "json_schema": BOUNDED},
            "end": "</a>",
        },
    }
    compiled = grammar_compiler.submit(Constraint(ConstraintKind.STRUCTURAL_TAG, json.dumps(tag))).result(
        COMPILE_TIMEOUT_S
    )
    assert accepts(compiled, '<a>{"s": "ab"}</a>') and not accepts(compiled, '<a>{"s": "a\x02"}</a>')


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
        future.result(COMPILE_TIMEOUT_S)
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
        compiler.submit(SCHEMA).result(COMPILE_TIMEOUT_S)
        assert called.wait(5)
    finally:
        compiler.shutdown()


def test_least_recently_used_grammars_leave_the_cache(test_model_dir, monkeypatch):
    monkeypatch.setattr(compiler_module, "MAX_CACHED_GRAMMARS", 2)
    compiler = GrammarCompiler(test_model_dir, 512, [2])
    try:
        regexes = [Constraint(ConstraintKind.REGEX, f"[a-z]{{{n}}}") for n in (1, 2, 3)]
        for constraint in regexes:
            compiler.submit(constraint).result(COMPILE_TIMEOUT_S)
        compiler.submit(regexes[0]).result(COMPILE_TIMEOUT_S)  # evicted by the third: compiled again
        assert (compiler.num_compiles, compiler.num_cache_hits) == (4, 0)
        compiler.submit(regexes[0]).result(COMPILE_TIMEOUT_S)
        assert compiler.num_cache_hits == 1
    finally:
        compiler.shutdown()


def test_ids_past_the_tokenizer_are_never_allowed(test_model_dir):
    """An LM head wider than the tokenizer (padded): the mask covers the logits' whole width."""
    compiler = GrammarCompiler(test_model_dir, 600, [2])
    try:
        grammar = RequestGrammar(compiler.submit(Constraint(ConstraintKind.REGEX, "[a-z ]+")).result(COMPILE_TIMEOUT_S))
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
            compiler.submit(SCHEMA).result(COMPILE_TIMEOUT_S)
    finally:
        compiler.shutdown()


def test_a_model_folder_without_a_tokenizer_refuses_constraints(test_model_dir, tmp_path):
    shutil.copy(test_model_dir / "config.json", tmp_path / "config.json")
    compiler = GrammarCompiler(tmp_path, 512, [2])
    try:
        with pytest.raises(GrammarError, match="the model's tokenizer could not be loaded"):
            compiler.submit(SCHEMA).result(COMPILE_TIMEOUT_S)
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


def test_compiles_run_at_a_lower_priority_than_the_step_loop(test_model_dir, monkeypatch):
    import os

    compiler = GrammarCompiler(test_model_dir, 512, [2])
    niceness: list[int] = []
    compile_now = compiler._compile

    def noting_niceness(constraint: Constraint):
        niceness.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        return compile_now(constraint)

    monkeypatch.setattr(compiler, "_compile", noting_niceness)
    try:
        compiler.submit(SCHEMA).result(COMPILE_TIMEOUT_S)
    finally:
        compiler.shutdown()
    own = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    assert niceness == [min(19, own + compiler_module.COMPILE_THREAD_NICENESS)]
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == own  # this thread keeps its own


CITY_CALL = {
    "type": "tag",
    "begin": "<tool_call>",
    "content": {"type": "json_schema", "json_schema": BOUNDED},
    "end": "</tool_call>",
}


@pytest.mark.parametrize(
    ("tag_format", "good", "excluded"),
    [
        (  # tool_choice auto: text, then calls once the model opens one; the text may not open a <think> block
            {"type": "triggered_tags", "triggers": ["<tool_call>"], "tags": [CITY_CALL], "excludes": ["<think>"]},
            'Checking. <tool_call>{"s": "ab"}</tool_call>',
            '<think> <tool_call>{"s": "ab"}</tool_call>',
        ),
        (  # calls only, several
            {"type": "tags_with_separator", "tags": [CITY_CALL], "separator": "\n", "at_least_one": True},
            '<tool_call>{"s": "ab"}</tool_call>\n<tool_call>{"s": "c"}</tool_call>',
            'x<tool_call>{"s": "ab"}</tool_call>',
        ),
        (  # a format whose calls open with a marker token (Mistral's [TOOL_CALLS]): only the compiler can build it
            {
                "type": "token_triggered_tags",
                "trigger_tokens": ["<|im_start|>"],
                "tags": [{**CITY_CALL, "begin": {"type": "token", "token": "<|im_start|>"}}],
                "stop_after_first": True,
            },
            'Checking. <|im_start|>{"s": "ab"}</tool_call>',
            None,
        ),
    ],
)
def test_structural_tags_keep_raw_control_characters_out_of_bounded_strings(
    grammar_compiler, test_tokenizer, tag_format, good, excluded
):
    import xgrammar as xgr

    constraint = Constraint(ConstraintKind.STRUCTURAL_TAG, json.dumps({"type": "structural_tag", "format": tag_format}))
    compiled = grammar_compiler.submit(constraint).result(COMPILE_TIMEOUT_S)

    def takes(text: str) -> bool:  # token by token, as generation does (the marker is one special token)
        matcher = xgr.GrammarMatcher(compiled)
        return all(matcher.accept_token(t) for t in test_tokenizer.encode(text, add_special_tokens=False))

    assert takes(good)
    assert not takes(good.replace('"ab"', '"a\x02"'))
    assert excluded is None or not takes(excluded)
