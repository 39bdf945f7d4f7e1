"""A reasoning model's `<think>...</think>` block, split from its answer as the text streams.

Where the block starts is read from the rendered prompt: a prompt that ends inside an open block (DeepSeek-R1
distills, Qwen3 with `enable_thinking: true` in templates that open it) starts the output in reasoning; one that
ends with a closed block (Qwen3's `enable_thinking: false`) has none; otherwise a template that knows the block
lets the model open it as its first words. Whitespace between the block and the answer belongs to neither.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from serve.text_patterns import WHITESPACE, partial_suffix

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


class ReasoningStart(enum.Enum):
    """How the output of one prompt begins, as far as reasoning goes."""

    NONE = "none"
    """The template knows no reasoning block, or the prompt closed it already: all output is the answer."""
    MAY_OPEN = "may_open"
    """The model may open the block as its first words."""
    OPEN = "open"
    """The prompt opened the block: the output is reasoning until it is closed."""


def reasoning_start(template: str, prompt: str) -> ReasoningStart:
    """Where a rendered prompt leaves the model, for a template whose source text is `template`."""
    if THINK_OPEN not in template:
        return ReasoningStart.NONE
    tail = prompt.rstrip(WHITESPACE)
    if tail.endswith(THINK_OPEN):
        return ReasoningStart.OPEN
    if tail.endswith(THINK_CLOSE):
        return ReasoningStart.NONE
    return ReasoningStart.MAY_OPEN


class _Phase(enum.Enum):
    UNDECIDED = "undecided"
    REASONING = "reasoning"
    ANSWER = "answer"


@dataclass(slots=True)
class ReasoningSplitter:
    """Feed released text; get (reasoning, answer) pieces back. `reasoning` gathers the whole block's text."""

    start: ReasoningStart
    reasoning: str = ""
    _phase: _Phase = _Phase.ANSWER
    _held: str = ""
    _skip_whitespace: bool = False
    _opened: bool = field(default=False)

    def __post_init__(self) -> None:
        if self.start is ReasoningStart.OPEN:
            self._phase, self._opened = _Phase.REASONING, True
        elif self.start is ReasoningStart.MAY_OPEN:
            self._phase = _Phase.UNDECIDED

    @property
    def has_reasoning(self) -> bool:
        """Whether this output had a reasoning block (a reply then carries `reasoning_content`)."""
        return self._opened

    def feed(self, text: str) -> tuple[str, str]:
        """(new reasoning text, new answer text) that may be released now."""
        self._held += text
        reasoning = answer = ""
        if self._phase is _Phase.UNDECIDED:
            stripped = self._held.lstrip(WHITESPACE)
            if stripped.startswith(THINK_OPEN):
                self._phase, self._opened = _Phase.REASONING, True
                self._held = stripped[len(THINK_OPEN) :]
            elif THINK_OPEN.startswith(stripped):
                return "", ""  # still could be the opening tag (or only whitespace so far)
            else:
                self._phase = _Phase.ANSWER
        if self._phase is _Phase.REASONING:
            index = self._held.find(THINK_CLOSE)
            if index < 0:
                keep = partial_suffix(self._held, THINK_CLOSE)
                reasoning, self._held = self._held[: len(self._held) - keep], self._held[len(self._held) - keep :]
                self.reasoning += reasoning
                return reasoning, ""
            reasoning = self._held[:index]
            self.reasoning += reasoning
            self._held = self._held[index + len(THINK_CLOSE) :]
            self._phase, self._skip_whitespace = _Phase.ANSWER, True
        if self._skip_whitespace:
            self._held = self._held.lstrip(WHITESPACE)
            self._skip_whitespace = not self._held
        answer, self._held = self._held, ""
        return reasoning, answer

    def finish(self) -> tuple[str, str]:
        """What is still held when the output ends: an unclosed block is all reasoning."""
        held, self._held = self._held, ""
        if self._phase is _Phase.REASONING:
            self.reasoning += held
            return held, ""
        if self._skip_whitespace:
            return "", ""
        return "", held
