"""How each model family writes a tool call, and which family a model's chat template belongs to.

`hermes` (Qwen2.5/3, Hermes, QwQ): `<tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>` per call.
`llama3_json` (Llama 3.1-3.3): `{"name": "f", "parameters": {...}}` per call, `; ` between calls (a leading
`<|python_tag|>` is a special token the detokenizer drops). `mistral`: `[TOOL_CALLS][{"name", "arguments"}, ...]`
with 9-character alphanumeric call ids. `generic`: Hermes's tags, for templates that know no tools: the tools and
the format are then described in a system message. `TOOL_CALL_PARSER` names one to override the detection.
"""

from __future__ import annotations

import secrets
import string
import uuid
from dataclasses import dataclass

from serve.text_patterns import Element, Name, Ws, lit

AUTO = "auto"
_ALPHANUMERIC = string.ascii_letters + string.digits
_NAME_KEY = (Ws(), lit('"name"'), Ws(), lit(":"), Ws(), Name(), Ws(), lit(","), Ws())
_OBJECT_HEADER = (Ws(), lit("{"), *_NAME_KEY, lit('"arguments"', '"parameters"'), Ws(), lit(":"))


@dataclass(frozen=True, slots=True)
class ToolCallFormat:
    """The text around each call, for the parser (patterns) and for the grammar (exact strings)."""

    name: str
    opener: str
    """Where calls begin in free text (the grammar's trigger too)."""
    header: tuple[Element, ...]
    """After the opener (or a list separator): up to the arguments value, capturing the tool's name."""
    closer: tuple[Element, ...]
    """After the arguments value, to the end of the call."""
    call_begin: str = ""
    """The grammar's exact text before a tool's name ... """
    call_middle: str = ""
    """... between the name and the arguments ..."""
    call_end: str = ""
    """... and after the arguments."""
    separator: str = "\n"
    """Between calls when the output holds calls only (`required`, a named tool)."""
    filler: str = ""
    """Characters besides whitespace that may sit between calls and are no content (Llama's `;`)."""
    list_open: tuple[Element, ...] | None = None
    """Mistral: after the opener comes one JSON list of call objects, `list_next` between them, `list_close` last."""
    list_next: tuple[Element, ...] = ()
    list_close: tuple[Element, ...] = ()
    opener_is_token: bool = False
    """The opener is one special token (it must stay visible in the text, and the grammar matches the token)."""
    short_ids: bool = False
    """Call ids of exactly 9 letters and digits (Mistral's templates reject any other)."""

    def new_call_id(self) -> str:
        if self.short_ids:
            return "".join(secrets.choice(_ALPHANUMERIC) for _ in range(9))
        return f"call_{uuid.uuid4().hex[:24]}"

    def template_call_id(self, call_id: str) -> str:
        """A client's call id as this family's template accepts it (Mistral: 9 alphanumerics, derived stably
        so an assistant call and the tool message answering it keep matching ids)."""
        if not self.short_ids or (len(call_id) == 9 and call_id.isalnum() and call_id.isascii()):
            return call_id
        digest = uuid.uuid5(uuid.NAMESPACE_URL, call_id).int
        chars = []
        for _ in range(9):
            digest, remainder = divmod(digest, len(_ALPHANUMERIC))
            chars.append(_ALPHANUMERIC[remainder])
        return "".join(chars)


HERMES = ToolCallFormat(
    name="hermes",
    opener="<tool_call>",
    header=_OBJECT_HEADER,
    closer=(Ws(), lit("}"), Ws(), lit("</tool_call>")),
    call_begin='<tool_call>\n{"name": "',
    call_middle='", "arguments": ',
    call_end="}\n</tool_call>",
)
GENERIC = ToolCallFormat(
    name="generic",
    opener=HERMES.opener,
    header=HERMES.header,
    closer=HERMES.closer,
    call_begin=HERMES.call_begin,
    call_middle=HERMES.call_middle,
    call_end=HERMES.call_end,
)
LLAMA3_JSON = ToolCallFormat(
    name="llama3_json",
    opener='{"name":',
    header=(Ws(), Name(), Ws(), lit(","), Ws(), lit('"parameters"', '"arguments"'), Ws(), lit(":")),
    closer=(Ws(), lit("}")),
    call_begin='{"name": "',
    call_middle='", "parameters": ',
    call_end="}",
    separator="; ",
    filler=";",
)
MISTRAL = ToolCallFormat(
    name="mistral",
    opener="[TOOL_CALLS]",
    header=_OBJECT_HEADER,
    closer=(Ws(), lit("}")),
    list_open=(Ws(), lit("[")),
    list_next=(Ws(), lit(",")),
    list_close=(Ws(), lit("]")),
    opener_is_token=True,
    short_ids=True,
)
FORMATS: dict[str, ToolCallFormat] = {f.name: f for f in (HERMES, LLAMA3_JSON, MISTRAL, GENERIC)}
MARKER_TOKENS = ("[TOOL_CALLS]",)
"""Tokens whose presence in the vocabulary the detection looks at."""


@dataclass(frozen=True, slots=True)
class ToolSupport:
    """What one model's template does with tools: the call format, and whether the template renders the tools
    and the calls in history itself (else the prompt builder describes them)."""

    format: ToolCallFormat
    template_renders_tools: bool


def detect_tool_support(template: str, vocab: set[str], override: str = AUTO) -> ToolSupport:
    """The family of a chat template (its source text, every named template joined) and the tokenizer's tokens
    (those of MARKER_TOKENS it has are enough)."""
    renders_tools = "tools" in template and "tool_calls" in template
    if override != AUTO:
        return ToolSupport(FORMATS[override], renders_tools)
    if "[TOOL_CALLS]" in vocab and "[TOOL_CALLS]" in template:
        return ToolSupport(MISTRAL, renders_tools)
    if "<tool_call>" in template:
        return ToolSupport(HERMES, renders_tools)
    if renders_tools and ('"parameters": ' in template or "<|python_tag|>" in template):
        return ToolSupport(LLAMA3_JSON, renders_tools)
    return ToolSupport(GENERIC, renders_tools)
