"""Tool calls out of generated text, incrementally: feed the text as it is released, get content and call events.

Streamed and whole replies run the same parser (a whole reply is one feed), so both see the same calls. A call
is announced (id, name) once its name is complete, then its arguments follow as raw JSON text fragments. Text
that only separates calls (whitespace, Llama's `;`) is not content; a name that is not one of the request's
tools, or text that stops looking like a call, turns back into content.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from serve.text_patterns import WHITESPACE, JsonValueScanner, Outcome, match_pattern, partial_suffix
from serve.tool_formats import ToolCallFormat


@dataclass(slots=True)
class ContentEvent:
    text: str


@dataclass(slots=True)
class CallStartEvent:
    index: int
    id: str
    name: str


@dataclass(slots=True)
class ArgumentsEvent:
    index: int
    fragment: str


ToolEvent = ContentEvent | CallStartEvent | ArgumentsEvent


@dataclass(slots=True)
class ParsedCall:
    id: str
    name: str
    arguments: str = ""
    is_complete: bool = False


class _State(enum.Enum):
    TEXT = "text"
    LIST_OPEN = "list_open"
    HEADER = "header"
    ARGUMENTS = "arguments"
    CLOSE = "close"
    LIST_NEXT = "list_next"


@dataclass(slots=True)
class ToolCallParser:
    """One choice's parser; `feed` and `finish` return the events in order."""

    format: ToolCallFormat
    tool_names: frozenset[str]
    calls: list[ParsedCall] = field(default_factory=list)
    _state: _State = _State.TEXT
    _buffer: str = ""
    _attempt: str = ""
    """Text consumed since the opener of the call being read: content again if it turns out not to be one."""
    _held_filler: str = ""
    _scanner: JsonValueScanner | None = None
    _events: list[ToolEvent] = field(default_factory=list)

    def feed(self, text: str) -> list[ToolEvent]:
        self._buffer += text
        while self._step():
            pass
        return self._take()

    def finish(self) -> list[ToolEvent]:
        """The end of the output: held-back text is released; a call cut short stays incomplete."""
        if self._state is _State.ARGUMENTS and self._scanner.finish_scalar():
            self.calls[-1].is_complete = True
        if self._state in (_State.LIST_OPEN, _State.HEADER) and not self._in_list:
            self._abandon_call()
        if self._state is _State.TEXT:
            self._content(self._buffer)
        self._buffer = ""
        if not self.calls and self._held_filler:
            self._events.append(ContentEvent(self._held_filler))
        self._held_filler = ""
        return self._take()

    # ---- states ---------------------------------------------------------------------------------

    def _step(self) -> bool:
        """Advance through the buffer; False when it needs more text."""
        if self._state is _State.TEXT:
            return self._scan_text()
        if self._state is _State.ARGUMENTS:
            return self._scan_arguments()
        if self._state is _State.LIST_NEXT:
            return self._scan_list_next()
        pattern = {_State.LIST_OPEN: self.format.list_open, _State.HEADER: self.format.header}.get(self._state)
        match = match_pattern(pattern or self.format.closer, self._buffer)
        if match.outcome is Outcome.PARTIAL:
            return False
        if match.outcome is Outcome.FAIL:
            return self._on_fail()
        if self._state is _State.HEADER:
            return self._start_call(match.names[0], match.end)
        if self._state is _State.LIST_OPEN:
            return self._advance(match.end, _State.HEADER)
        return self._advance(match.end, _State.LIST_NEXT if self.format.list_open else _State.TEXT)  # CLOSE

    def _scan_list_next(self) -> bool:
        """Mistral, after a call: `,` and another call, or `]` and the list is over."""
        following = match_pattern(self.format.list_next, self._buffer)
        if following.outcome is Outcome.MATCH:
            return self._advance(following.end, _State.HEADER)
        closing = match_pattern(self.format.list_close, self._buffer)
        if closing.outcome is Outcome.MATCH:
            return self._advance(closing.end, _State.TEXT)
        if Outcome.PARTIAL in (following.outcome, closing.outcome):
            return False
        return self._on_fail()

    def _scan_text(self) -> bool:
        opener = self.format.opener
        index = self._buffer.find(opener)
        if index < 0:
            keep = partial_suffix(self._buffer, opener)
            self._content(self._buffer[: len(self._buffer) - keep])
            self._buffer = self._buffer[len(self._buffer) - keep :]
            return False
        self._content(self._buffer[:index])
        self._attempt = self._held_filler + opener  # separators before a call are no content, unless no call
        self._held_filler = ""
        self._buffer = self._buffer[index + len(opener) :]
        self._state = _State.LIST_OPEN if self.format.list_open else _State.HEADER
        return True

    def _start_call(self, name: str, end: int) -> bool:
        if name not in self.tool_names:
            return self._on_fail()
        call = ParsedCall(self.format.new_call_id(), name)
        self.calls.append(call)
        self._events.append(CallStartEvent(len(self.calls) - 1, call.id, name))
        self._scanner = JsonValueScanner()
        self._attempt = ""
        self._buffer = self._buffer[end:]
        self._state = _State.ARGUMENTS
        return True

    def _scan_arguments(self) -> bool:
        if not self._buffer:
            return False
        start, end = self._scanner.feed(self._buffer)
        fragment = self._buffer[start:end]
        if fragment:
            self.calls[-1].arguments += fragment
            self._events.append(ArgumentsEvent(len(self.calls) - 1, fragment))
        if not self._scanner.done:
            self._buffer = ""
            return False
        self.calls[-1].is_complete = True  # the rest of the call is fixed text (the grammar wrote it)
        self._buffer = self._buffer[end:]
        self._state = _State.CLOSE
        return True

    def _advance(self, end: int, state: _State) -> bool:
        if self._state in (_State.LIST_OPEN, _State.HEADER):
            self._attempt += self._buffer[:end]
        self._buffer = self._buffer[end:]
        self._state = state
        return True

    def _on_fail(self) -> bool:
        """The text after an opener is no call (of a known tool): it is content after all."""
        if self._state in (_State.LIST_OPEN, _State.HEADER) and not self._in_list:
            self._abandon_call()
        else:  # a broken call or list end after a call: what follows is plain text
            self._state = _State.TEXT
        return True

    def _abandon_call(self) -> None:
        self._content(self._attempt)
        self._attempt = ""
        self._state = _State.TEXT

    @property
    def _in_list(self) -> bool:
        """Reading the header of a second or later call in Mistral's list (its opener was long consumed)."""
        return self._state is _State.HEADER and bool(self.format.list_open) and not self._attempt

    # ---- content ----------------------------------------------------------------------------------

    def _content(self, text: str) -> None:
        """Free text; a trailing run of separator characters is held until text or a call follows."""
        if not text:
            return
        combined = self._held_filler + text
        fillers = WHITESPACE + self.format.filler
        end = len(combined.rstrip(fillers))
        if end:
            self._events.append(ContentEvent(combined[:end]))
        self._held_filler = combined[end:]

    def _take(self) -> list[ToolEvent]:
        events, self._events = self._events, []
        return events
