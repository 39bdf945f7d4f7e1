"""Bad tools, tool choices, tool-call histories, response formats and template variables: a 400 naming the field,
before anything reaches the engine."""

from __future__ import annotations

import pytest

from model_handler.tiny_model import default_model_dir
from tests.openai_schema import validate
from tests.serve.scripted_engine import ScriptedEngine, engine_info
from tests.serve.tool_fixtures import MESSAGES, TOOLS

CHAT = "/v1/chat/completions"
NAMED = {"type": "function", "function": {"name": "get_time"}}


def _call(arguments: str) -> dict:
    return {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": arguments}}


def _history(call: dict) -> list[dict]:
    return [*MESSAGES, {"role": "assistant", "content": None, "tool_calls": [call]}]


@pytest.mark.parametrize(
    "extra, param, words",
    [
        ({"tool_choice": "required"}, "tool_choice", "only allowed when 'tools' are specified"),
        ({"tool_choice": NAMED}, "tool_choice", "only allowed when 'tools' are specified"),
        ({"tools": TOOLS, "tool_choice": {**NAMED, "function": {"name": "nope"}}}, "tool_choice", "'nope'"),
        ({"tools": TOOLS, "tool_choice": "nope"}, "tool_choice", "'nope'"),  # TGI's bare name
        (
            {
                "tools": TOOLS,
                "tool_choice": {
                    "type": "allowed_tools",
                    "allowed_tools": {"mode": "auto", "tools": [{"type": "function", "function": {"name": "x"}}]},
                },
            },
            "tool_choice",
            "'x'",
        ),
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools.0.function.name", "letters"),
        ({"tools": [TOOLS[0], TOOLS[0]]}, "tools", "appears twice"),
        ({"tools": [{"type": "custom", "custom": {"name": "x"}}]}, "tools.0.type", "function"),
        ({"tools": [{"type": "function"}]}, "tools.0.function", "Missing"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]},
            "tools.0.function.parameters",
            "dictionary",
        ),
        ({"tool_prompt": "Use the tools."}, "tool_prompt", "needs 'tools'"),
        ({"tools": TOOLS, "tool_choice": "none", "tool_prompt": "Use them."}, "tool_prompt", "needs 'tools'"),
        ({"functions": [{"name": "f"}]}, "functions", "use 'tools'"),
        ({"function_call": "auto"}, "function_call", "use 'tools'"),
        ({"messages": _history(_call("{not json"))}, "messages.1.tool_calls.0.function.arguments", "not JSON"),
        (
            {"messages": _history({"type": "function", "function": {"name": "f", "arguments": "{}"}})},
            "messages.1.tool_calls.0.id",
            "Missing",
        ),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "exactly one"),
        ({"response_format": {"type": "xml"}}, "response_format", "tag"),
        ({"response_format": {"type": "json"}}, "response_format.json.value", "Missing"),
        ({"response_format": {"type": "json", "value": "{bad"}}, "response_format.value", "not JSON"),
        ({"response_format": {"type": "regex", "value": 5}}, "response_format.regex.value", "string"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": 5}}},
            "response_format.json_schema.json_schema.schema",
            "dictionary",
        ),
        ({"chat_template_kwargs": {"tools": []}}, "chat_template_kwargs", "'tools' is set by the server"),
        ({"chat_template_kwargs": {"add_generation_prompt": False}}, "chat_template_kwargs", "set by the server"),
        ({"thinking_token_budget": -1}, "thinking_token_budget", "below minimum"),
    ],
)
def test_bad_tool_and_format_fields_are_400s(scripted, make_client, extra, param, words):
    reply = make_client(scripted).post(CHAT, json={"messages": MESSAGES, **extra})
    assert reply.status_code == 400, reply.data
    body = reply.get_json()
    validate(body, "ErrorResponse")
    assert body["error"]["param"] == param and words in body["error"]["message"], body
    assert scripted.submitted == []


def test_a_reasoning_budget_needs_a_template_with_reasoning(make_client):
    """The Llama-style template has no <think> block: a budget for one is refused, not ignored."""
    llama = ScriptedEngine(engine_info(str(default_model_dir("tiny-llama3-json"))), lambda request: [])
    reply = make_client(llama).post(CHAT, json={"messages": MESSAGES, "thinking_token_budget": 10})
    assert reply.status_code == 400 and reply.get_json()["error"]["param"] == "thinking_token_budget"
    assert llama.submitted == []


def test_each_form_reaches_the_engine_as_a_constraint(scripted, make_client):
    """What the engine is sent (the constraint's kind) for each form; the grammar itself is tested elsewhere."""
    client = make_client(scripted)
    forms = [
        ({"response_format": {"type": "text"}}, None),
        (
            {"response_format": {"type": "json_object"}, "chat_template_kwargs": {"enable_thinking": False}},
            "json_object",
        ),
        (
            {"response_format": {"type": "regex", "value": "a+"}, "chat_template_kwargs": {"enable_thinking": False}},
            "regex",
        ),
        ({"response_format": {"type": "json", "value": {"type": "object"}}}, "structural_tag"),  # the model may think
        ({"tools": TOOLS}, "structural_tag"),
        ({"tools": TOOLS, "tool_choice": "none"}, None),
        ({}, None),
    ]
    for extra, kind in forms:
        reply = client.post(CHAT, json={"messages": MESSAGES, "max_tokens": 2, **extra})
        assert reply.status_code == 200, reply.data
        constraint = scripted.submitted[-1].sampling_params.constraint
        assert (constraint.kind.value if constraint else None) == kind, extra
    generate = client.post(
        "/generate", json={"inputs": "x", "parameters": {"grammar": {"type": "regex", "value": "a"}}}
    )
    assert generate.status_code == 200 and scripted.submitted[-1].sampling_params.constraint.value == "a"
