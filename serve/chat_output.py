"""One chat choice's generated text, in OpenAI's terms: reasoning, content and tool calls, as stream deltas and as
the final message. A whole reply is the same parse fed all at once, so streamed and whole replies agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from serve.reasoning import ReasoningSplitter, ReasoningStart
from serve.tool_formats import ToolCallFormat
from serve.tool_parser import ArgumentsEvent, CallStartEvent, ContentEvent, ToolCallParser


@dataclass(frozen=True, slots=True)
class OutputShape:
    """What to look for in one request's output: a reasoning block, and tool calls of these tools."""

    reasoning: ReasoningStart = ReasoningStart.NONE
    tool_format: ToolCallFormat | None = None
    tool_names: frozenset[str] = frozenset()
    calls_only: bool = False
    """The grammar allows tool calls only (`required`, a named tool): the answer has no content."""

    @property
    def has_reasoning(self) -> bool:
        return self.reasoning is not ReasoningStart.NONE


@dataclass(slots=True)
class ChoiceOutput:
    """Feed each released piece of text with `feed` (stream deltas come back), then call `finish` once."""

    shape: OutputShape
    content: str = ""
    _splitter: ReasoningSplitter = field(init=False)
    _parser: ToolCallParser | None = field(init=False)

    def __post_init__(self) -> None:
        self._splitter = ReasoningSplitter(self.shape.reasoning)
        self._parser = None
        if self.shape.tool_format is not None:
            self._parser = ToolCallParser(self.shape.tool_format, self.shape.tool_names)

    @property
    def tool_calls(self) -> list:
        return self._parser.calls if self._parser is not None else []

    def feed(self, text: str) -> list[dict]:
        """The OpenAI `delta` objects this text releases (none while it is held back)."""
        if not text:
            return []
        return self._deltas(*self._splitter.feed(text), finishing=False)

    def finish(self) -> list[dict]:
        return self._deltas(*self._splitter.finish(), finishing=True)

    def finish_reason(self, engine_reason: str) -> str:
        """OpenAI's `tool_calls` when the output made calls and ended on its own; `length` stays `length`."""
        return "tool_calls" if self.tool_calls and engine_reason == "stop" else engine_reason

    def message(self) -> dict:
        """The whole reply's `message` (after `finish`)."""
        calls = self.tool_calls
        message: dict = {"role": "assistant", "content": self.content if self.content or not calls else None}
        if self.shape.has_reasoning:
            message["reasoning_content"] = self._splitter.reasoning if self._splitter.has_reasoning else None
        if calls:
            message["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in calls
            ]
        message["refusal"] = None
        return message

    def _deltas(self, reasoning: str, answer: str, finishing: bool) -> list[dict]:
        deltas: list[dict] = []
        if reasoning:
            deltas.append({"reasoning_content": reasoning})
        if self._parser is None:
            events = [ContentEvent(answer)] if answer else []
        else:
            events = self._parser.feed(answer) if answer else []
            if finishing:
                events += self._parser.finish()
        for event in events:
            if isinstance(event, ContentEvent):
                self.content += event.text
                _append(deltas, {"content": event.text})
            elif isinstance(event, CallStartEvent):
                call = {"index": event.index, "id": event.id, "type": "function"}
                call["function"] = {"name": event.name, "arguments": ""}
                deltas.append({"tool_calls": [call]})
            elif isinstance(event, ArgumentsEvent):
                _append(deltas, {"tool_calls": [{"index": event.index, "function": {"arguments": event.fragment}}]})
        return deltas


def _append(deltas: list[dict], delta: dict) -> None:
    """Add a delta, merged into the previous one when both carry text of the same kind (and the same call)."""
    last = deltas[-1] if deltas else None
    if last is not None and "content" in delta and set(last) == {"content"}:
        last["content"] += delta["content"]
        return
    if last is not None and "tool_calls" in delta and set(last) == {"tool_calls"}:
        previous, new = last["tool_calls"][0], delta["tool_calls"][0]
        if previous["index"] == new["index"] and "id" not in previous:
            previous["function"]["arguments"] += new["function"]["arguments"]
            return
    deltas.append(delta)
