"""The constraints the HTTP side builds for response formats, tools and reasoning: xgrammar compiles every one,
accepts what it should and refuses the rest, and what a random walk under it produces parses into valid calls."""

from __future__ import annotations

import json

import jsonschema
import pytest

from model_handler.constraints import Constraint, ConstraintKind
from model_handler.tiny_model import default_model_dir
from serve.chat_output import ChoiceOutput, OutputShape
from serve.reasoning import ReasoningStart
from serve.schema_rewrites import grammar_schema
from serve.structural_tags import AnswerFormat, ToolPlan, ToolSpec, build_constraint
from serve.tool_formats import GENERIC, HERMES, LLAMA3_JSON, MISTRAL, ToolCallFormat
from tests.serve.constraint_walks import accepts, random_walk

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "metric": {"type": "boolean"},
    },
    "required": ["city", "days"],
}
TIME = {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 4}}, "required": ["zone"]}
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
TOOLS = tuple(ToolSpec(name, json.dumps(schema), strict=True) for name, schema in SCHEMAS.items())
ANSWER = AnswerFormat(ConstraintKind.JSON_SCHEMA, json.dumps(WEATHER), strict=True)


@pytest.fixture(scope="module")
def hermes_dir() -> str:
    return str(default_model_dir("tiny"))


@pytest.fixture(scope="module")
def llama_dir() -> str:
    return str(default_model_dir("tiny-llama3-json"))


@pytest.fixture(scope="module")
def mistral_dir(tmp_path_factory) -> str:
    """A folder whose tokenizer has Mistral's `[TOOL_CALLS]` special token (the tiny Llama one, one token renamed)."""
    source = default_model_dir("tiny-llama3-json")
    out = tmp_path_factory.mktemp("mistral-tokens")
    for name in ("config.json", "generation_config.json", "tokenizer_config.json"):
        (out / name).write_text((source / name).read_text())
    (out / "tokenizer.json").write_text(
        (source / "tokenizer.json").read_text().replace("<|python_tag|>", "[TOOL_CALLS]")
    )
    return str(out)


def _plan(fmt: ToolCallFormat, required: bool, parallel: bool, tools=TOOLS) -> ToolPlan:
    return ToolPlan(fmt, tools, required, parallel)


def _call(fmt: ToolCallFormat, name: str, arguments: dict) -> str:
    return fmt.call_begin + name + fmt.call_middle + json.dumps(arguments) + fmt.call_end


def _parse(fmt: ToolCallFormat, text: str, reasoning=ReasoningStart.NONE) -> ChoiceOutput:
    output = ChoiceOutput(OutputShape(reasoning, fmt, frozenset(SCHEMAS)))
    output.feed(text)
    output.finish()
    return output


def _check_calls(output: ChoiceOutput, at_least: int = 1, at_most: int | None = None) -> None:
    calls = output.tool_calls
    assert at_least <= len(calls) <= (at_most if at_most is not None else len(calls)), [c.name for c in calls]
    for call in calls:
        assert call.is_complete
        jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])


def test_plain_answer_formats_stay_plain_constraints(hermes_dir):
    assert build_constraint(None, None) is None
    regex = AnswerFormat(ConstraintKind.REGEX, "(yes|no)")
    for answer in (ANSWER, AnswerFormat(ConstraintKind.JSON_OBJECT), regex):
        constraint = build_constraint(answer, None)
        assert constraint == Constraint(answer.kind, answer.value, answer.strict)
    assert accepts(hermes_dir, build_constraint(regex, None), "yes")
    assert not accepts(hermes_dir, build_constraint(regex, None), "maybe", complete=False)
    assert accepts(hermes_dir, build_constraint(ANSWER, None), '{"city": "Rome", "days": 3}')


@pytest.mark.parametrize("fmt_name", ["hermes", "generic", "llama3_json"])
@pytest.mark.parametrize("parallel", [True, False])
def test_required_allows_calls_only(hermes_dir, fmt_name, parallel):
    fmt = {"hermes": HERMES, "generic": GENERIC, "llama3_json": LLAMA3_JSON}[fmt_name]
    constraint = build_constraint(None, _plan(fmt, required=True, parallel=parallel))
    one = _call(fmt, "get_time", {"zone": "CET"})
    two = one + fmt.separator + _call(fmt, "get_weather", {"city": "Oslo", "days": 2})
    assert accepts(hermes_dir, constraint, one)
    assert accepts(hermes_dir, constraint, two) is parallel
    assert not accepts(hermes_dir, constraint, "Hello " + one, complete=False)  # no text before the calls
    assert not accepts(hermes_dir, constraint, _call(fmt, "get_time", {"zone": "CET", "x": 1}), complete=False)
    assert not accepts(hermes_dir, constraint, _call(fmt, "rm", {}), complete=False)
    assert not accepts(hermes_dir, constraint, "")  # at least one call
    for seed in range(6):
        _check_calls(_parse(fmt, random_walk(hermes_dir, constraint, seed)), 1, None if parallel else 1)


@pytest.mark.parametrize("fmt", [HERMES, LLAMA3_JSON])
def test_a_named_tool_is_called_exactly_once(hermes_dir, fmt):
    tools = tuple(t for t in TOOLS if t.name == "get_weather")
    constraint = build_constraint(None, _plan(fmt, required=True, parallel=False, tools=tools))
    assert not accepts(hermes_dir, constraint, _call(fmt, "get_time", {"zone": "CET"}), complete=False)
    for seed in range(6):
        output = _parse(fmt, random_walk(hermes_dir, constraint, seed))
        _check_calls(output, 1, 1)
        assert output.tool_calls[0].name == "get_weather" and output.content == ""


@pytest.mark.parametrize("fmt", [HERMES, LLAMA3_JSON, GENERIC])
def test_auto_is_text_until_a_call_opens_then_a_valid_call(hermes_dir, fmt):
    constraint = build_constraint(None, _plan(fmt, required=False, parallel=True))
    assert accepts(hermes_dir, constraint, "Just text, no call.")
    text_then_call = "Checking. " + _call(fmt, "get_time", {"zone": "UTC"})
    assert accepts(hermes_dir, constraint, text_then_call)
    assert not accepts(hermes_dir, constraint, "Checking. " + fmt.call_begin + "rm", complete=False)
    for seed in range(6):  # the model opened a call: the rest of it is a valid call
        text = random_walk(hermes_dir, constraint, seed, prefix="Let me look. " + fmt.opener)
        output = _parse(fmt, text)
        _check_calls(output, 1)
        assert output.content.startswith("Let me look.")


def test_auto_without_parallel_calls_allows_one_call_and_nothing_after(hermes_dir):
    constraint = build_constraint(None, _plan(HERMES, required=False, parallel=False))
    call = _call(HERMES, "get_time", {"zone": "UTC"})
    assert accepts(hermes_dir, constraint, "Text. " + call)
    assert not accepts(hermes_dir, constraint, call + "\n" + call, complete=False)


def test_auto_with_a_response_format_is_the_answer_or_calls(hermes_dir):
    constraint = build_constraint(ANSWER, _plan(HERMES, required=False, parallel=True))
    assert accepts(hermes_dir, constraint, '{"city": "Paris", "days": 1}')
    assert accepts(hermes_dir, constraint, _call(HERMES, "get_time", {"zone": "UTC"}))
    assert not accepts(hermes_dir, constraint, "free text", complete=False)


@pytest.mark.parametrize("required", [True, False])
@pytest.mark.parametrize("parallel", [True, False])
def test_mistral_calls_are_one_list_after_the_marker_token(mistral_dir, required, parallel):
    constraint = build_constraint(None, _plan(MISTRAL, required=required, parallel=parallel))
    calls = [{"name": "get_time", "arguments": {"zone": "CET"}}, {"name": "get_weather", "arguments": WEATHER_ARGS}]
    assert accepts(mistral_dir, constraint, "[TOOL_CALLS]" + json.dumps(calls[:1]))
    assert accepts(mistral_dir, constraint, "[TOOL_CALLS]" + json.dumps(calls)) is parallel
    assert accepts(mistral_dir, constraint, "Plain answer.") is not required
    prefix = "" if required else "Sure. [TOOL_CALLS]"
    for seed in range(4):
        text = random_walk(mistral_dir, constraint, seed, prefix=prefix)
        if required:
            assert text.startswith("[TOOL_CALLS]")  # the grammar forced the marker token
        _check_calls(_parse(MISTRAL, text), 1, None if parallel else 1)


WEATHER_ARGS = {"city": "Rome", "days": 4}


@pytest.mark.parametrize("start", [ReasoningStart.OPEN, ReasoningStart.MAY_OPEN])
def test_the_constraint_applies_after_the_reasoning_block(hermes_dir, start):
    constraint = build_constraint(ANSWER, None, start)
    opener = "" if start is ReasoningStart.OPEN else "<think>"
    answer = '{"city": "Oslo", "days": 7}'
    assert accepts(hermes_dir, constraint, opener + "Some free reasoning {[<.</think>\n\n" + answer)
    assert not accepts(hermes_dir, constraint, opener + "Reasoning.</think>\n\nnot json", complete=False)
    assert accepts(hermes_dir, constraint, answer) is (start is ReasoningStart.MAY_OPEN)  # may skip the block
    budgeted = build_constraint(ANSWER, None, start, reasoning_budget=3)
    for seed in range(4):
        text = random_walk(hermes_dir, budgeted, seed, prefix=opener)
        output = ChoiceOutput(OutputShape(start))
        output.feed(text)
        output.finish()
        assert output.message()["reasoning_content"] is not None
        jsonschema.validate(json.loads(output.content), WEATHER)


def test_a_reasoning_budget_alone_closes_the_block(hermes_dir):
    assert build_constraint(None, None, ReasoningStart.OPEN) is None  # no budget, no answer format: free
    constraint = build_constraint(None, None, ReasoningStart.OPEN, reasoning_budget=2)
    for seed in range(3):
        text = random_walk(hermes_dir, constraint, seed, max_steps=600)
        reasoning = text[: text.index("</think>")]
        assert "</think>" in text and len(reasoning) > 0


def test_reasoning_then_required_calls_with_llama_tokens(llama_dir):
    constraint = build_constraint(None, _plan(LLAMA3_JSON, required=True, parallel=True), ReasoningStart.OPEN, 4)
    for seed in range(4):
        text = random_walk(llama_dir, constraint, seed)
        output = _parse(LLAMA3_JSON, text, ReasoningStart.OPEN)
        _check_calls(output)


def test_non_strict_schemas_allow_unlisted_properties(hermes_dir):
    lax = AnswerFormat(ConstraintKind.JSON_SCHEMA, json.dumps(TIME), strict=False)
    constraint = build_constraint(lax, None, ReasoningStart.OPEN)
    assert accepts(hermes_dir, constraint, '</think>{"zone": "UTC", "extra": 1}')
    strict = build_constraint(AnswerFormat(ConstraintKind.JSON_SCHEMA, json.dumps(TIME)), None, ReasoningStart.OPEN)
    assert not accepts(hermes_dir, strict, '</think>{"zone": "UTC", "extra": 1}', complete=False)
    nested = {"type": "object", "properties": {"a": {"type": "object", "properties": {}}}, "$defs": {"b": TIME}}
    loosened = grammar_schema(nested, strict=False)
    assert loosened["additionalProperties"] is True and loosened["properties"]["a"]["additionalProperties"] is True
    assert loosened["$defs"]["b"]["additionalProperties"] is True and "additionalProperties" not in TIME
    assert "additionalProperties" not in grammar_schema(nested, strict=True)


@pytest.mark.parametrize("strict", [True, False])
def test_bounded_strings_never_hold_raw_control_characters(hermes_dir, strict):
    """xgrammar 0.2.9 lets a string with maxLength hold U+0000-U+001F unescaped (not JSON): the engine stops it,
    and the length bounds still hold."""
    schema = {"type": "object", "properties": {"s": {"type": "string", "minLength": 1, "maxLength": 3}}}
    answer = AnswerFormat(ConstraintKind.JSON_SCHEMA, json.dumps(schema), strict)
    for constraint in (build_constraint(answer, None), build_constraint(answer, None, ReasoningStart.OPEN)):
        prefix = "</think>" if constraint.kind is ConstraintKind.STRUCTURAL_TAG else ""
        assert accepts(hermes_dir, constraint, prefix + '{"s": "abc"}')
        assert not accepts(hermes_dir, constraint, prefix + '{"s": "a\x01"}', complete=False)
        assert not accepts(hermes_dir, constraint, prefix + '{"s": "abcd"}', complete=False)
        assert not accepts(hermes_dir, constraint, prefix + '{"s": ""}', complete=False)
