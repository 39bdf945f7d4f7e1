"""Incremental detokenization: pieces add up to decode(all), split characters are held back, specials hidden."""

from __future__ import annotations

import pytest

from serve.detokenizer import IncrementalDetokenizer

TEXTS = [
    "Hello world, this is plain text.",
    "Ünïcödé wörds: naïve café déjà vu",
    "emoji 😀 and 日本語 text; mixed 👩‍👩‍👧 family",
    "  leading spaces\n\nand\ttabs  ",
]


@pytest.mark.parametrize("text", TEXTS)
def test_pieces_equal_decode_of_the_whole(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.add(i) for i in ids]
    assert "".join(pieces) + detok.flush() == tokenizer.decode(ids) == text


def test_multibyte_character_split_across_tokens_is_held_back(tokenizer):
    ids = tokenizer.encode("a😀b", add_special_tokens=False)
    # The tiny tokenizer spells the emoji as four single-byte tokens.
    assert [tokenizer.token_bytes(i) for i in ids] == [b"a", b"\xf0", b"\x9f", b"\x98", b"\x80", b"b"]
    detok = IncrementalDetokenizer(tokenizer)
    assert [detok.add(i) for i in ids] == ["a", "", "", "", "😀", "b"]
    assert all("\ufffd" not in piece for piece in ["a", "😀", "b"])


def test_special_tokens_are_not_shown(tokenizer):
    eos = tokenizer.hf.eos_token_id
    ids = tokenizer.encode("Hi there", add_special_tokens=False) + [eos]
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.add(i) for i in ids]
    assert pieces[-1] == "" and "".join(pieces) == "Hi there"
    assert tokenizer.is_special(eos) and tokenizer.token_text(eos) == "<|im_end|>"


def test_unfinished_character_at_the_end_is_flushed_as_replacement(tokenizer):
    ids = tokenizer.encode("x😀", add_special_tokens=False)[:-1]  # generation stopped mid-character
    detok = IncrementalDetokenizer(tokenizer)
    assert "".join(detok.add(i) for i in ids) == "x"
    assert detok.flush() == tokenizer.decode(ids)[1:] != ""


def test_special_tokens_asked_for_show_their_text(tokenizer):
    """A tool-call marker that is a special token (Mistral's [TOOL_CALLS]) must reach the reply's parser."""
    start = tokenizer.hf.convert_tokens_to_ids("<|im_start|>")
    ids = tokenizer.encode("a😀", add_special_tokens=False)[:-1] + [start] + tokenizer.encode("b c", False)
    detok = IncrementalDetokenizer(tokenizer, {start: "<|im_start|>"})
    pieces = [detok.add(i) for i in ids] + [detok.flush()]
    assert "".join(pieces) == "a\ufffd<|im_start|>b c"  # a character cut by the marker is shown as cut
    assert pieces[len(ids) - 3] == "\ufffd<|im_start|>"
