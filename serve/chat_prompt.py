"""A chat request's prompt: the conversation as its chat template expects it (tool calls with their arguments as
objects, tool results with their call ids, `name`s), the tools, the template's own variables, and where the
rendered prompt leaves a reasoning block.

Templates that know no tools get them described in the conversation's first system or user message, with the
`generic` call format, and see earlier calls and results as text in that format.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from serve.errors import validation
from serve.reasoning import ReasoningStart, reasoning_start
from serve.tokenizer import TextTokenizer
from serve.tool_formats import ToolSupport

RESERVED_TEMPLATE_VARIABLES = frozenset(
    {
        "messages",
        "conversation",
        "tools",
        "documents",
        "chat_template",
        "add_generation_prompt",
        "continue_final_message",
        "tokenize",
        "return_dict",
        "bos_token",
        "eos_token",
        "pad_token",
        "unk_token",
    }
)
"""`chat_template_kwargs` may not set these: the server sets them from the request."""

GENERIC_INSTRUCTIONS = (
    "To call a function, reply with one tag per call, each holding a JSON object with the function's name and "
    'arguments:\n<tool_call>{"name": <function-name>, "arguments": <arguments-object>}</tool_call>'
)


@dataclass(frozen=True, slots=True)
class ChatPrompt:
    text: str
    reasoning: ReasoningStart


def render_chat_prompt(
    tokenizer: TextTokenizer,
    messages: list[dict[str, Any]],
    tools: list[dict] | None,
    support: ToolSupport,
    template_kwargs: dict[str, Any] | None = None,
    tool_prompt: str | None = None,
    format_note: str | None = None,
) -> ChatPrompt:
    """Render `messages` (template dicts, see `template_message`) with `tools` (None: no tools in this prompt);
    `format_note` (what a response format is for, from its description) is added as the tools' text is."""
    for key in template_kwargs or {}:
        if key in RESERVED_TEMPLATE_VARIABLES:
            raise validation(f"Invalid 'chat_template_kwargs': '{key}' is set by the server.", "chat_template_kwargs")
    messages = [dict(m) for m in messages]
    native = support.template_renders_tools
    if not native:
        messages = _calls_as_text(messages)
    if tools is not None and (support.format.name == "generic" or tool_prompt is not None):
        listing = None if native else "\n".join(json.dumps(tool) for tool in tools)
        instructions = tool_prompt if tool_prompt is not None else GENERIC_INSTRUCTIONS
        text = (
            instructions
            if listing is None
            else f"# Tools\n\nYou may call these functions:\n{listing}\n\n{instructions}"
        )
        _add_instructions(messages, text)
    if format_note is not None:
        _add_instructions(messages, format_note)
    text = tokenizer.apply_chat_template(messages, tools if native else None, template_kwargs or {})
    return ChatPrompt(text, reasoning_start(tokenizer.chat_template_source, text))


def template_message(
    role: str,
    content: str,
    support: ToolSupport,
    where: str,
    name: str | None = None,
    tool_calls: list | None = None,
    tool_call_id: str | None = None,
    reasoning_content: str | None = None,
) -> dict[str, Any]:
    """One message as chat templates read it; call ids adapted to what the family's template accepts."""
    message: dict[str, Any] = {"role": role, "content": content}
    if name is not None:
        message["name"] = name
    if tool_calls:
        fmt = support.format
        message["tool_calls"] = [
            call.template_dict(f"{where}.tool_calls.{i}", fmt.template_call_id(call.id))
            for i, call in enumerate(tool_calls)
        ]
    if tool_call_id is not None:
        message["tool_call_id"] = support.format.template_call_id(tool_call_id)
    if reasoning_content is not None:
        message["reasoning_content"] = reasoning_content
    return message


def _add_instructions(messages: list[dict], text: str) -> None:
    """Add `text` to the first system message (else before the first user message's text: some templates take no
    system turn)."""
    for role, combine in (("system", lambda old: f"{old}\n\n{text}"), ("user", lambda old: f"{text}\n\n{old}")):
        for message in messages:
            if message["role"] == role:
                message["content"] = combine(message["content"])
                return
    messages.insert(0, {"role": "system", "content": text})


def _calls_as_text(messages: list[dict]) -> list[dict]:
    """For templates that render no tool calls: earlier calls become the assistant's text in the generic format,
    and tool results user turns (runs of results merged), so templates that want roles to alternate accept them."""
    out: list[dict] = []
    for message in messages:
        calls = message.pop("tool_calls", None)
        if calls:
            written = [
                "<tool_call>"
                + json.dumps({"name": c["function"]["name"], "arguments": c["function"]["arguments"]})
                + "</tool_call>"
                for c in calls
            ]
            message["content"] = "\n".join(filter(None, [message["content"], *written]))
        if message["role"] == "tool":
            result = f"<tool_response>\n{message['content']}\n</tool_response>"
            if out and out[-1].pop("is_tool_result", False):
                out[-1]["content"] += "\n" + result
                out[-1]["is_tool_result"] = True
                continue
            message = {"role": "user", "content": result, "is_tool_result": True}
        out.append(message)
    for message in out:
        message.pop("is_tool_result", None)
    return out
