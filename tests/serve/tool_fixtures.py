"""Tools, schemas and reply checks shared by the tool and structured-output tests.

The schemas keep every value short (enums, bounded integers and strings): a model with random weights, held to
them by the grammar, then finishes its calls within a few dozen tokens.
"""

from __future__ import annotations

import json

import jsonschema

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}
TIME = {
    "type": "object",
    "properties": {"zone": {"type": "string", "maxLength": 4}},
    "required": ["zone"],
    "additionalProperties": False,
}
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather forecast", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "description": "Time in a zone", "parameters": TIME}},
]
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]


def check_tool_calls(message: dict, at_least: int = 1, at_most: int | None = None) -> list[dict]:
    """OpenAI's shape of a reply of calls, every call's arguments valid for its tool; the calls."""
    calls = message["tool_calls"]
    assert message["content"] is None, message["content"]
    assert at_least <= len(calls) <= (at_most or len(calls)), calls
    for call in calls:
        assert call["type"] == "function" and call["id"].startswith("call_") and len(call["id"]) > 10
        assert isinstance(call["function"]["arguments"], str)
        jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS[call["function"]["name"]])
    assert len({call["id"] for call in calls}) == len(calls)
    return calls


def accumulate_stream(chunks: list[dict], index: int = 0) -> dict:
    """A choice's message from its stream chunks, as a client builds it (and checks on the way that each call's
    first delta has index, id, type, name and empty arguments, and later ones only argument fragments)."""
    message: dict = {"content": None, "reasoning_content": None, "tool_calls": [], "finish_reason": None}
    for chunk in chunks:
        for choice in chunk["choices"]:
            if choice["index"] != index:
                continue
            delta = choice["delta"]
            for key in ("content", "reasoning_content"):
                if delta.get(key):
                    message[key] = (message[key] or "") + delta[key]
            for call in delta.get("tool_calls") or []:
                if "id" in call:
                    assert call["index"] == len(message["tool_calls"]) and call["type"] == "function"
                    assert call["function"]["arguments"] == "" and call["function"]["name"]
                    message["tool_calls"].append({"id": call["id"], "type": "function", "function": call["function"]})
                else:
                    assert set(call) == {"index", "function"} and set(call["function"]) == {"arguments"}
                    message["tool_calls"][call["index"]]["function"]["arguments"] += call["function"]["arguments"]
            if choice["finish_reason"] is not None:
                assert message["finish_reason"] is None, "two finish reasons"
                message["finish_reason"] = choice["finish_reason"]
    return message


def same_calls(first: list[dict], second: list[dict]) -> bool:
    """The same functions with the same arguments (ids differ between replies)."""
    return [c["function"] for c in first] == [c["function"] for c in second]
