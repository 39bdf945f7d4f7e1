"""The model's tokenizer on the HTTP side: chat template, encoding, decoding and per-token bytes.

Loaded once per worker from the engine's model folder with transformers' fast tokenizer (no torch import).
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from typing import Any

import gevent

from serve.errors import ApiError, ErrorKind

_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
OFFLOAD_CHARS = 20_000
"""Texts at least this long are tokenized off the gevent hub: tokenizing them there would stall its other
greenlets."""


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: every byte maps to one printable character (the inverse decodes pieces)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


_UNICODE_TO_BYTE = {char: byte for byte, char in _bytes_to_unicode().items()}


def token_spans(text: str, encoding: Any, first: int = 0) -> list[tuple[int, str, int, int]]:
    """(id, text, start, stop) of an Encoding of `text`'s tokens from index `first` on; start and stop are UTF-8
    byte offsets into `text`, as TGI's /tokenize gives them."""
    ids, offsets = encoding.ids[first:], encoding.offsets[first:]
    if not ids:
        return []
    # Character offsets to byte offsets by counting only the bytes between one offset and the next
    # (re-encoding every prefix was quadratic: 12 s for a 1 MB input). Offsets mostly grow; they step
    # back a little where several tokens share a character (byte-level pieces of one code point).
    position = offsets[0][0]
    byte_position = len(text[:position].encode())

    def to_bytes(offset: int) -> int:
        nonlocal position, byte_position
        if offset >= position:
            byte_position += len(text[position:offset].encode())
        else:
            byte_position -= len(text[offset:position].encode())
        position = offset
        return byte_position

    return [
        (token_id, text[start:stop], to_bytes(start), to_bytes(stop))
        for token_id, (start, stop) in zip(ids, offsets, strict=True)
    ]


class TextTokenizer:
    """Wraps a transformers fast tokenizer; the Rust `tokenizers.Tokenizer` does the per-token work."""

    def __init__(self, hf_tokenizer: Any) -> None:
        self.hf = hf_tokenizer
        self.backend = hf_tokenizer.backend_tokenizer
        added = self.backend.get_added_tokens_decoder()
        self.special_ids: frozenset[int] = frozenset(
            [i for i, tok in added.items() if tok.special] + list(hf_tokenizer.all_special_ids)
        )
        self._added_content = {i: tok.content for i, tok in added.items()}
        decoder = json.loads(self.backend.to_str()).get("decoder") or {}
        self._byte_level = "ByteLevel" in json.dumps(decoder)
        self.token_bytes = lru_cache(maxsize=65536)(self._token_bytes)

    @classmethod
    def load(cls, model_dir: str) -> TextTokenizer:
        """The fast tokenizer of a model folder; AutoTokenizer only when the fast class cannot read it."""
        from transformers import PreTrainedTokenizerFast

        try:
            hf = PreTrainedTokenizerFast.from_pretrained(model_dir)
        except Exception:  # e.g. only a sentencepiece model file: let transformers convert it
            from transformers import AutoTokenizer

            hf = AutoTokenizer.from_pretrained(model_dir)
        return cls(hf)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    # ---- text -> ids ------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return self.encoding(text, add_special_tokens).ids

    def encoding(self, text: str, add_special_tokens: bool) -> Any:
        """The Rust tokenizer's Encoding; a long text is encoded in gevent's native thread pool.

        `Tokenizer.encode` holds the GIL throughout (0.5 s for 1 MB of text: every stream of this worker would
        stall); `encode_batch` releases it, so from a native thread the hub keeps serving meanwhile.
        """
        if len(text) < OFFLOAD_CHARS:
            return self.backend.encode(text, add_special_tokens=add_special_tokens)
        return gevent.get_hub().threadpool.apply(
            lambda: self.backend.encode_batch([text], add_special_tokens=add_special_tokens)[0]
        )

    def encode_with_offsets(self, text: str, add_special_tokens: bool) -> list[tuple[int, str, int, int]]:
        """(id, text, start, stop) per token; offsets are UTF-8 byte offsets into `text`, as TGI's /tokenize."""
        return token_spans(text, self.encoding(text, add_special_tokens))

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict] | None = None,
        template_kwargs: dict[str, Any] | None = None,
    ) -> str:
        """The prompt text for a conversation; a last assistant message is continued, not closed (TGI).
        `tools` and `template_kwargs` (e.g. `enable_thinking`) reach the template as its variables."""
        continue_final = bool(messages) and messages[-1].get("role") == "assistant"
        try:
            return self.hf.apply_chat_template(
                messages,
                tools=tools,
                tokenize=False,
                add_generation_prompt=not continue_final,
                continue_final_message=continue_final,
                **(template_kwargs or {}),
            )
        except Exception as exc:  # jinja2 errors, raise_exception(), no template at all
            if getattr(self.hf, "chat_template", None) is None:
                raise ApiError(ErrorKind.TEMPLATE, "template not found") from exc
            raise ApiError(ErrorKind.TEMPLATE, str(exc) or type(exc).__name__) from exc

    @property
    def chat_template_source(self) -> str:
        """The chat template's text (every named template, joined), for telling model families apart."""
        template = getattr(self.hf, "chat_template", None)
        if isinstance(template, dict):
            return "\n".join(str(t) for t in template.values())
        return template or ""

    def token_id(self, content: str) -> int | None:
        """The id of a token by its exact content (an added or special token such as `[TOOL_CALLS]`), or None."""
        return self.backend.token_to_id(content)

    # ---- ids -> text ------------------------------------------------------------------------------

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def is_special(self, token_id: int) -> bool:
        return token_id in self.special_ids

    def token_text(self, token_id: int) -> str:
        """One token shown alone: its bytes as UTF-8, with U+FFFD where it holds part of a character."""
        return self.token_bytes(token_id).decode("utf-8", errors="replace")

    def _token_bytes(self, token_id: int) -> bytes:
        """The exact bytes a token stands for (OpenAI's logprob `bytes`), even a partial UTF-8 character."""
        if token_id in self._added_content:
            return self._added_content[token_id].encode()
        piece = self.backend.id_to_token(token_id)
        if piece is None:
            return b""
        if self._byte_level and all(char in _UNICODE_TO_BYTE for char in piece):
            return bytes(_UNICODE_TO_BYTE[char] for char in piece)
        match = _BYTE_FALLBACK.match(piece)
        if match:
            return bytes([int(match.group(1), 16)])
        if "\u2581" in piece:  # sentencepiece's word-start marker stands for a space
            return piece.replace("\u2581", " ").encode()
        return self.decode([token_id], skip_special_tokens=False).encode()
