"""The constraint of a chat request: its answer format, its tool calls and its reasoning block as one xgrammar
structural tag (JSON written here; serve/ never imports xgrammar), or a plain JSON schema / regex when that is all.

`tool_choice: auto` lets the model write text until it opens a call (the format's trigger), then holds the call
to a known tool's name and arguments schema; `required` and a named tool allow calls only. A reasoning block comes
first, unconstrained but for its closing tag, optionally within a token budget; the constraint applies after it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from model_handler.constraints import Constraint, ConstraintKind
from serve.reasoning import THINK_CLOSE, THINK_OPEN, ReasoningStart
from serve.schema_rewrites import grammar_schema
from serve.tool_formats import ToolCallFormat

_ANSWER_GAP = {"type": "regex", "pattern": "[ \\t\\r\\n]{0,4}"}
"""Between a reasoning block and a JSON or regex answer (Qwen3 writes a blank line there)."""


@dataclass(frozen=True, slots=True)
class AnswerFormat:
    """What the text answer must be (a response format): JSON_SCHEMA, JSON_OBJECT or REGEX, as in Constraint."""

    kind: ConstraintKind
    value: str = ""
    strict: bool = True


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """One callable tool: its name and arguments schema (`strict`: no properties beyond the listed ones)."""

    name: str
    parameters: str
    """The arguments' JSON schema as JSON text (hashable, so plans compare and cache)."""
    strict: bool


@dataclass(frozen=True, slots=True)
class ToolPlan:
    """The calls a request allows: `required` means calls only (a named tool: `required` with that one tool and
    `parallel` False); `auto` means text, then calls once the model opens one."""

    format: ToolCallFormat
    tools: tuple[ToolSpec, ...]
    required: bool
    parallel: bool


def build_constraint(
    answer: AnswerFormat | None,
    plan: ToolPlan | None,
    reasoning: ReasoningStart = ReasoningStart.NONE,
    reasoning_budget: int | None = None,
) -> Constraint | None:
    """The request's constraint, or None when the output is free."""
    has_block = reasoning is not ReasoningStart.NONE
    if plan is None and answer is not None and not has_block:
        return Constraint(answer.kind, answer.value, answer.strict)  # the engine applies `strict` itself
    if plan is None and answer is None and (not has_block or reasoning_budget is None):
        return None
    excludes = [THINK_OPEN, THINK_CLOSE] if has_block else []
    if plan is None:
        body = _answer_element(answer) if answer is not None else {"type": "any_text", "excludes": excludes}
        is_free_text = answer is None
    elif plan.required or answer is not None:
        calls = _calls_only(plan)
        body = calls if answer is None else {"type": "or", "elements": [_answer_element(answer), calls]}
        is_free_text = False
    else:
        body = _text_then_calls(plan, excludes)
        is_free_text = True
    elements = []
    if has_block:
        elements.append(_reasoning_block(reasoning, reasoning_budget))
        if not is_free_text:
            elements.append(_ANSWER_GAP)
    elements.append(body)
    tag_format = elements[0] if len(elements) == 1 else {"type": "sequence", "elements": elements}
    return Constraint(ConstraintKind.STRUCTURAL_TAG, json.dumps({"type": "structural_tag", "format": tag_format}))


def _reasoning_block(reasoning: ReasoningStart, budget: int | None) -> dict:
    content: dict[str, Any] = {"type": "any_text", "excludes": [THINK_OPEN, THINK_CLOSE]}
    if budget is not None:
        content["max_tokens"] = budget
    if reasoning is ReasoningStart.OPEN:
        return {"type": "tag", "begin": "", "content": content, "end": THINK_CLOSE}
    return {"type": "optional", "content": {"type": "tag", "begin": THINK_OPEN, "content": content, "end": THINK_CLOSE}}


def _answer_element(answer: AnswerFormat) -> dict:
    if answer.kind is ConstraintKind.REGEX:
        return {"type": "regex", "pattern": answer.value}
    if answer.kind is ConstraintKind.JSON_OBJECT:
        return _json_element({"type": "object"}, strict=True)
    return _json_element(json.loads(answer.value), answer.strict)


def _json_element(schema: dict | bool, strict: bool) -> dict:
    """A JSON value of this schema (the engine bounds the whitespace in it)."""
    return {"type": "json_schema", "json_schema": grammar_schema(schema, strict)}


def _call_tags(plan: ToolPlan) -> list[dict]:
    fmt = plan.format
    return [
        {
            "type": "tag",
            "begin": fmt.call_begin + tool.name + fmt.call_middle,
            "content": _json_element(json.loads(tool.parameters), tool.strict),
            "end": fmt.call_end,
        }
        for tool in plan.tools
    ]


def _text_then_calls(plan: ToolPlan, excludes: list[str]) -> dict:
    if plan.format.list_open is not None:
        call_list = _call_list(plan)
        trigger = {"type": "token_triggered_tags", "trigger_tokens": [plan.format.opener], "tags": [call_list]}
        return {**trigger, "stop_after_first": True}
    return {
        "type": "triggered_tags",
        "triggers": [plan.format.opener],
        "tags": _call_tags(plan),
        "excludes": excludes,
        "stop_after_first": not plan.parallel,
    }


def _calls_only(plan: ToolPlan) -> dict:
    if plan.format.list_open is not None:
        return _call_list(plan)
    tags = _call_tags(plan)
    if len(tags) == 1 and not plan.parallel:
        return tags[0]
    return {
        "type": "tags_with_separator",
        "tags": tags,
        "separator": plan.format.separator,
        "at_least_one": True,
        "stop_after_first": not plan.parallel,
    }


def _call_list(plan: ToolPlan) -> dict:
    """Mistral: the opener token, then one JSON list of `{"name", "arguments"}` objects."""
    calls = [
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "enum": [tool.name]},
                "arguments": grammar_schema(json.loads(tool.parameters), tool.strict),
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for tool in plan.tools
    ]
    schema: dict[str, Any] = {"type": "array", "items": {"anyOf": calls}, "minItems": 1}
    if not plan.parallel:
        schema["maxItems"] = 1
    content = {"type": "json_schema", "json_schema": schema}
    return {"type": "tag", "begin": {"type": "token", "token": plan.format.opener}, "content": content, "end": ""}
