"""Incremental detokenization of one request's generated tokens (TGI's prefix/read offsets).

Each new token releases the text it completes: nothing while a UTF-8 character is still split across tokens
(the decoder shows U+FFFD there) and nothing for special tokens, so the pieces always add up to
`tokenizer.decode(all_ids, skip_special_tokens=True)`; except the special tokens a caller asks to see (a tool-call
marker such as Mistral's `[TOOL_CALLS]`), which release their own text.
"""

from __future__ import annotations

from typing import Protocol

_REPLACEMENT = "\ufffd"


class Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    """Feed token ids one by one with `add`; call `flush` once at the end for any held-back text."""

    def __init__(self, tokenizer: Decoder, visible_ids: dict[int, str] | None = None) -> None:
        self._tokenizer = tokenizer
        self._visible = visible_ids or {}
        self._ids: list[int] = []
        # Text is decoded over ids[prefix:]: the window before `read` is context already released, so
        # tokenizers that treat the first token specially (leading space, byte fallback) decode consistently.
        self._prefix_offset = 0
        self._read_offset = 0

    @property
    def token_ids(self) -> list[int]:
        return self._ids

    def add(self, token_id: int) -> str:
        """The new text this token completes ("" when it is special or ends in a partial character)."""
        if token_id in self._visible:  # shown as its own text; decoding starts afresh after it
            held = self.flush()
            self._ids.append(token_id)
            self._prefix_offset = self._read_offset = len(self._ids)
            return held + self._visible[token_id]
        self._ids.append(token_id)
        window = self._ids[self._prefix_offset :]
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(window)
        if len(new_text) > len(prefix_text) and not new_text.endswith(_REPLACEMENT):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return new_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back when generation ends (an unfinished character shows as U+FFFD)."""
        if self._read_offset == len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        return new_text[len(prefix_text) :] if len(new_text) > len(prefix_text) else ""

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True) if ids else ""
