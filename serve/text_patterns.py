"""Incremental matching of the fixed pieces around a tool call (`<tool_call>`, `{"name": "f", "arguments": `, ...)
and a scanner that finds where one JSON value ends, both on text that arrives a few characters at a time.

A pattern is a sequence of literals, optional whitespace, and quoted names; matching a prefix of the text says
MATCH (with where it ended and the names it read), PARTIAL (more text could still match) or FAIL.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

WHITESPACE = " \t\r\n"


class Outcome(enum.Enum):
    MATCH = "match"
    PARTIAL = "partial"
    FAIL = "fail"


@dataclass(frozen=True, slots=True)
class Lit:
    """Exactly this text; `choices` lists alternatives (any one matches)."""

    choices: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Ws:
    """Any run of JSON whitespace, possibly empty."""


@dataclass(frozen=True, slots=True)
class Name:
    """A JSON string with no escapes (tool names are letters, digits, `_` and `-`); its content is captured."""


Element = Lit | Ws | Name


def lit(*choices: str) -> Lit:
    return Lit(tuple(choices))


@dataclass(slots=True)
class PatternMatch:
    outcome: Outcome
    end: int = 0
    names: list[str] = field(default_factory=list)


def match_pattern(pattern: tuple[Element, ...], text: str, start: int = 0) -> PatternMatch:
    """Match `pattern` against `text[start:]`; PARTIAL when the text ends before the pattern could be decided."""
    position, names = start, []
    for element in pattern:
        if isinstance(element, Ws):
            while position < len(text) and text[position] in WHITESPACE:
                position += 1
            continue
        if position >= len(text):
            return PatternMatch(Outcome.PARTIAL)
        if isinstance(element, Lit):
            rest = text[position:]
            matched = next((c for c in element.choices if rest.startswith(c)), None)
            if matched is None:
                if any(c.startswith(rest) for c in element.choices):
                    return PatternMatch(Outcome.PARTIAL)
                return PatternMatch(Outcome.FAIL)
            position += len(matched)
            continue
        if text[position] != '"':
            return PatternMatch(Outcome.FAIL)
        close = text.find('"', position + 1)
        if close < 0:
            return PatternMatch(Outcome.FAIL if "\\" in text[position:] else Outcome.PARTIAL)
        name = text[position + 1 : close]
        if "\\" in name:
            return PatternMatch(Outcome.FAIL)
        names.append(name)
        position = close + 1
    return PatternMatch(Outcome.MATCH, position, names)


def partial_suffix(text: str, literal: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of `literal` (text to hold back)."""
    for size in range(min(len(literal) - 1, len(text)), 0, -1):
        if text.endswith(literal[:size]):
            return size
    return 0


class JsonValueScanner:
    """Finds the end of one JSON value in text fed piece by piece (the value itself is not checked: the grammar
    made it valid). Leading whitespace is skipped and not part of the value."""

    def __init__(self) -> None:
        self.started = False
        self.done = False
        self._depth = 0
        self._in_string = False
        self._escaped = False
        self._scalar = False

    def feed(self, text: str) -> tuple[int, int]:
        """(start, end) of the value's characters in `text`: `start` skips leading whitespace before the value;
        when the value ends in this piece, `done` turns true and `end` is just past its last character."""
        start = 0
        for position, char in enumerate(text):
            if not self.started:
                if char in WHITESPACE:
                    start = position + 1
                    continue
                self.started = True
                self._scalar = char not in '{["'
                if char == '"':
                    self._in_string = True
                    continue
            if self._scalar:
                if char in ",}]" + WHITESPACE:
                    self.done = True
                    return start, position
                continue
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif char == "\\":
                    self._escaped = True
                elif char == '"':
                    self._in_string = False
                    if self._depth == 0:
                        self.done = True
                        return start, position + 1
                continue
            if char == '"':
                self._in_string = True
            elif char in "{[":
                self._depth += 1
            elif char in "}]":
                self._depth -= 1
                if self._depth == 0:
                    self.done = True
                    return start, position + 1
        return start, len(text)

    def finish_scalar(self) -> bool:
        """At the end of the text, a bare scalar (number, true, false, null) is complete."""
        if self.started and self._scalar and not self.done:
            self.done = True
        return self.done
