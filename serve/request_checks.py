"""Checks of OpenAI request fields that need the served model (its vocabulary, its name) or walk nested content:
`logit_bias`, `stop_token_ids`, and the content parts and output modalities a text-only model cannot take.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from serve.errors import unsupported, validation

MAX_LOGIT_BIAS = 100.0
"""OpenAI's bound on each bias, either sign."""


def logit_bias_ids(logit_bias: dict[str, float] | None, vocab_size: int) -> dict[int, float]:
    """OpenAI's `{"token id": bias}` map as the engine's {id: bias}; a 400 names a bad id or bias and the
    vocabulary size."""
    biases: dict[int, float] = {}
    for key, bias in (logit_bias or {}).items():
        try:
            token_id = int(key)
        except ValueError:
            raise validation(
                f"Invalid 'logit_bias': {key!r} is not a token id (keys are token ids of this model's vocabulary "
                f"of {vocab_size} tokens, as strings).",
                "logit_bias",
            ) from None
        if not 0 <= token_id < vocab_size:
            raise validation(
                f"Invalid 'logit_bias': token id {token_id} is outside the vocabulary of {vocab_size} tokens "
                f"(ids 0 to {vocab_size - 1}).",
                "logit_bias",
            )
        if not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
            raise validation(
                f"Invalid 'logit_bias': the bias {bias} of token id {token_id} is outside [-100, 100] (the "
                f"vocabulary has {vocab_size} tokens).",
                "logit_bias",
            )
        biases[token_id] = float(bias)
    return biases


def check_token_ids(name: str, token_ids: Sequence[int] | None, vocab_size: int) -> None:
    for token_id in token_ids or ():
        if not 0 <= token_id < vocab_size:
            raise validation(
                f"Invalid '{name}': token id {token_id} is outside the vocabulary of {vocab_size} tokens.", name
            )


def refuse_non_text_parts(messages: Sequence[Any], model_name: str) -> None:
    """A 400 naming the first image, audio or file content part: every model served here is text-only."""
    for i, message in enumerate(messages):
        if not isinstance(message.content, list):
            continue
        for j, part in enumerate(message.content):
            if part.type != "text":
                where = f"messages.{i}.content.{j}"
                raise unsupported(
                    f"Invalid '{where}': {part.type} content parts are not supported: {model_name} is a "
                    "text-only model (send text parts only).",
                    where,
                )


def refuse_audio_output(modalities: Sequence[str] | None, audio: object) -> None:
    if modalities and "audio" in modalities:
        raise unsupported("Invalid 'modalities': this model outputs text only; 'audio' is not supported.", "modalities")
    if audio is not None:
        raise unsupported("Invalid 'audio': audio output is not supported: this model outputs text only.", "audio")
