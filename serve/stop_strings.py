"""Stop strings, checked on the text generated so far, so a match may span several tokens.

OpenAI semantics (`include_stop=False`): the stop text and everything after it are dropped, and text that could
still become the start of a stop string is held back until it cannot. TGI semantics (`include_stop=True`):
the output keeps the stop text and ends right after it.
"""

from __future__ import annotations


class StopStringMatcher:
    """Feed text pieces with `feed`; it says what may be released and whether a stop string was hit."""

    def __init__(self, stops: list[str], include_stop: bool) -> None:
        self._stops = [stop for stop in stops if stop]
        self._include_stop = include_stop
        self._max_len = max((len(stop) for stop in self._stops), default=0)
        self._text = ""
        self._released = 0
        self.matched: str | None = None

    @property
    def text(self) -> str:
        """All text released so far (the reply's text when generation ends)."""
        return self._text[: self._released]

    def feed(self, piece: str) -> tuple[str, bool]:
        """Add new text; returns (text now safe to show, whether a stop string ended the output)."""
        if self.matched is not None:
            return "", True
        old_len = len(self._text)
        self._text += piece
        if not self._stops:
            return self._release(len(self._text)), False
        match = self._find(max(0, old_len - self._max_len + 1))
        if match is not None:
            start, stop = match
            self.matched = stop
            end = start + len(stop) if self._include_stop else start
            released = self._release(end)
            self._text = self._text[:end]
            return released, True
        if self._include_stop:
            return self._release(len(self._text)), False
        return self._release(len(self._text) - self._held_back()), False

    def finish(self) -> str:
        """Release what was held back when generation ends without a stop string."""
        if self.matched is not None:
            return ""
        return self._release(len(self._text))

    def _release(self, end: int) -> str:
        if end <= self._released:
            return ""
        out = self._text[self._released : end]
        self._released = end
        return out

    def _find(self, start: int) -> tuple[int, str] | None:
        """The earliest stop string occurrence at or after `start` (ties: the longer one)."""
        best: tuple[int, str] | None = None
        for stop in self._stops:
            index = self._text.find(stop, start)
            if index < 0:
                continue
            if best is None or index < best[0] or (index == best[0] and len(stop) > len(best[1])):
                best = (index, stop)
        return best

    def _held_back(self) -> int:
        """Length of the longest text suffix that is a proper prefix of some stop string."""
        longest = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(self._text)), longest, -1):
                if self._text.endswith(stop[:size]):
                    longest = size
                    break
        return longest
