"""Parsing generated text into content, reasoning and tool calls: every family's format, fed whole and one
character at a time (the stream's deltas must add up to the whole reply), and text that only looks like a call."""

from __future__ import annotations

import json

import pytest

from serve.chat_output import ChoiceOutput, OutputShape
from serve.reasoning import ReasoningStart, reasoning_start
from serve.tool_formats import FORMATS, GENERIC, HERMES, LLAMA3_JSON, MISTRAL, detect_tool_support
from serve.tool_parser import ToolCallParser

TOOLS = frozenset({"get_weather", "get_time"})
HERMES_TWO = (
    'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": [1, 2]}}\n'
    '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"tz": "CET \\"x\\" }"}}\n</tool_call>'
)
LLAMA_TWO = (
    '{"name": "get_weather", "parameters": {"city": "Paris", "days": [1, 2]}}; '
    '{"name": "get_time", "parameters": {"tz": "CET \\"x\\" }"}}'
)
MISTRAL_TWO = (
    '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "days": [1, 2]}}, '
    '{"name": "get_time", "arguments": {"tz": "CET \\"x\\" }"}}]'
)
EXPECTED_ARGUMENTS = [{"city": "Paris", "days": [1, 2]}, {"tz": 'CET "x" }'}]


def _run(shape: OutputShape, text: str, pieces: list[str]) -> tuple[dict, list[dict]]:
    """(whole message, stream deltas) for the same text."""
    whole = ChoiceOutput(shape)
    whole.feed(text)
    whole.finish()
    streamed = ChoiceOutput(shape)
    deltas = [d for piece in pieces for d in streamed.feed(piece)] + streamed.finish()
    return whole.message(), deltas


def _accumulate(deltas: list[dict]) -> dict:
    """What a client builds from the deltas (as openai's stream helpers do)."""
    out: dict = {"content": "", "reasoning_content": "", "tool_calls": []}
    for delta in deltas:
        out["content"] += delta.get("content", "")
        out["reasoning_content"] += delta.get("reasoning_content", "")
        for call in delta.get("tool_calls", []):
            if "id" in call:
                assert call["index"] == len(out["tool_calls"]) and call["type"] == "function"
                assert call["function"]["arguments"] == ""  # the first delta of a call: name, empty arguments
                out["tool_calls"].append({"id": call["id"], "type": "function", "function": dict(call["function"])})
            else:
                assert set(call) == {"index", "function"} and set(call["function"]) == {"arguments"}
                out["tool_calls"][call["index"]]["function"]["arguments"] += call["function"]["arguments"]
    return out


@pytest.mark.parametrize(
    "fmt, text, content",
    [(HERMES, HERMES_TWO, "Let me check."), (LLAMA3_JSON, LLAMA_TWO, None), (MISTRAL, MISTRAL_TWO, None)],
)
@pytest.mark.parametrize("chunking", ["whole", "chars", "threes"])
def test_two_calls_whole_and_streamed_agree(fmt, text, content, chunking):
    size = {"whole": len(text), "chars": 1, "threes": 3}[chunking]
    pieces = [text[i : i + size] for i in range(0, len(text), size)]
    message, deltas = _run(OutputShape(tool_format=fmt, tool_names=TOOLS), text, pieces)
    assert message["content"] == content
    calls = message["tool_calls"]
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert [json.loads(c["function"]["arguments"]) for c in calls] == EXPECTED_ARGUMENTS
    if fmt is MISTRAL:
        assert all(len(c["id"]) == 9 and c["id"].isalnum() for c in calls)
    else:
        assert all(c["id"].startswith("call_") for c in calls)
    streamed = _accumulate(deltas)
    assert streamed["content"] == (content or "")
    assert [c["function"] for c in streamed["tool_calls"]] == [
        {"name": c["function"]["name"], "arguments": c["function"]["arguments"]} for c in calls
    ]
    if chunking != "whole":  # arguments really stream: more than one fragment per call
        assert sum(1 for d in deltas for c in d.get("tool_calls", []) if "id" not in c) > 2


def test_plain_text_passes_through_unchanged():
    text = "Hello; world {not a call} <tool and\n\n"
    for fmt in FORMATS.values():
        message, deltas = _run(OutputShape(tool_format=fmt, tool_names=TOOLS), text, list(text))
        assert message["content"] == text and "tool_calls" not in message
        assert _accumulate(deltas)["content"] == text


@pytest.mark.parametrize(
    "fmt, text",
    [
        (HERMES, '<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call>'),  # not one of the tools
        (HERMES, '<tool_call>\n{"arguments": {}, "name": "get_time"}\n</tool_call>'),  # not the format's order
        (LLAMA3_JSON, '{"name": "Bob", "age": 3}'),  # a JSON answer, not a call
        (MISTRAL, "[TOOL_CALLS] nothing"),
    ],
)
def test_text_that_is_not_a_call_stays_content(fmt, text):
    message, deltas = _run(OutputShape(tool_format=fmt, tool_names=TOOLS), text, list(text))
    assert message["content"] == text and "tool_calls" not in message
    assert _accumulate(deltas)["content"] == text


def test_a_call_cut_short_keeps_its_partial_arguments():
    parser = ToolCallParser(HERMES, TOOLS)
    parser.feed('<tool_call>\n{"name": "get_time", "arguments": {"tz": "CE')
    parser.finish()
    assert [(c.name, c.arguments, c.is_complete) for c in parser.calls] == [("get_time", '{"tz": "CE', False)]


def test_calls_and_text_around_them():
    text = 'Sure.\n\n<tool_call>{"name": "get_time", "arguments": {}}</tool_call>\n\nDone.\n'
    message, deltas = _run(OutputShape(tool_format=GENERIC, tool_names=TOOLS), text, list(text))
    assert message["content"] == "Sure.\n\nDone."  # separators next to calls are no content
    assert message["tool_calls"][0]["function"] == {"name": "get_time", "arguments": "{}"}
    assert _accumulate(deltas)["content"] == "Sure.\n\nDone."


@pytest.mark.parametrize(
    "start, text, reasoning, content",
    [
        (ReasoningStart.OPEN, "let me think\n</think>\n\nThe answer.", "let me think\n", "The answer."),
        (ReasoningStart.MAY_OPEN, "<think>hmm</think>42", "hmm", "42"),
        (ReasoningStart.MAY_OPEN, "\n<think>hmm</think>\n42", "hmm", "42"),
        (ReasoningStart.MAY_OPEN, "<thin air", None, "<thin air"),
        (ReasoningStart.MAY_OPEN, "42 </think>", None, "42 </think>"),
        (ReasoningStart.OPEN, "never closed <", "never closed <", ""),
    ],
)
def test_reasoning_block_is_split_from_the_answer(start, text, reasoning, content):
    message, deltas = _run(OutputShape(reasoning=start), text, list(text))
    assert (message["reasoning_content"], message["content"]) == (reasoning, content)
    streamed = _accumulate(deltas)
    assert (streamed["reasoning_content"], streamed["content"]) == (reasoning or "", content)


def test_reasoning_then_tool_call():
    text = (
        'I need the weather.</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n'
        "</tool_call>"
    )
    shape = OutputShape(ReasoningStart.OPEN, HERMES, TOOLS)
    message, deltas = _run(shape, text, list(text))
    assert message["reasoning_content"] == "I need the weather." and message["content"] is None
    assert json.loads(message["tool_calls"][0]["function"]["arguments"]) == {"city": "Rome"}
    assert ChoiceOutput(shape).finish_reason("stop") == "stop"
    whole = ChoiceOutput(shape)
    whole.feed(text)
    whole.finish()
    assert whole.finish_reason("stop") == "tool_calls" and whole.finish_reason("length") == "length"


def test_reasoning_start_from_the_prompt():
    template = "... {{ '<think>\\n' }} ..."
    assert reasoning_start(template, "<|im_start|>assistant\n<think>\n") is ReasoningStart.OPEN
    assert reasoning_start(template, "assistant\n<think>\n\n</think>\n\n") is ReasoningStart.NONE
    assert reasoning_start(template, "<|im_start|>assistant\n") is ReasoningStart.MAY_OPEN
    assert reasoning_start("no block", "<|im_start|>assistant\n<think>\n") is ReasoningStart.NONE


@pytest.mark.parametrize(
    "template, vocab, expected",
    [
        ("{% for t in tools %}<tool_call>{{ m.tool_calls }}{% endfor %}", set(), "hermes"),
        ("{{ tools }} {{ m.tool_calls }} <|python_tag|>", set(), "llama3_json"),
        ('{{ tools }}{{ m.tool_calls }}"parameters": ', set(), "llama3_json"),
        ("[AVAILABLE_TOOLS]{{ tools }}[TOOL_CALLS]{{ m.tool_calls }}", {"[TOOL_CALLS]"}, "mistral"),
        ("{{ messages }}", set(), "generic"),
    ],
)
def test_detection(template, vocab, expected):
    assert detect_tool_support(template, vocab).format.name == expected
    assert detect_tool_support(template, vocab, "mistral").format is MISTRAL  # TOOL_CALL_PARSER wins


def test_mistral_template_ids_are_nine_alphanumerics_and_stable():
    derived = MISTRAL.template_call_id("call_abc123def456")
    assert len(derived) == 9 and derived.isalnum() and derived == MISTRAL.template_call_id("call_abc123def456")
    assert MISTRAL.template_call_id("abcDEF123") == "abcDEF123"
    assert HERMES.template_call_id("call_x") == "call_x"
