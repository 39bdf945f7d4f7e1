"""The token limits settled from the model's limit and the KV cache (TGI 3's default), with their error numbers."""

from __future__ import annotations

import pytest

from model_handler.context_limits import (
    LIMITED_BY_KV_CACHE,
    LIMITED_BY_MODEL,
    LIMITED_BY_SETTING,
    blocks_for,
    resolve_context,
)

HINT = "KV_CACHE_CPU_BYTES=1.0 GiB at 2.0 MiB a block"


def test_unset_total_is_the_smaller_of_the_model_and_the_cache():
    # A 7B model in bf16 on CPU: 512 blocks of 16 hold 8192 tokens, the model allows 32768.
    limits = resolve_context(None, None, model_limit=32768, num_kv_blocks=512, block_size=16, cache_size_hint=HINT)
    assert (limits.max_model_len, limits.max_input_tokens, limits.limited_by) == (8192, 8191, LIMITED_BY_KV_CACHE)
    assert (limits.model_limit, limits.kv_cache_tokens) == (32768, 8192)
    # A GPU cache far larger than the model's context: the model's limit.
    limits = resolve_context(None, None, model_limit=131072, num_kv_blocks=27971, block_size=16, cache_size_hint=HINT)
    assert (limits.max_model_len, limits.max_input_tokens, limits.limited_by) == (131072, 131071, LIMITED_BY_MODEL)


def test_set_values_are_kept_and_checked_against_the_cache():
    limits = resolve_context(4096, 1000, model_limit=32768, num_kv_blocks=512, block_size=16, cache_size_hint=HINT)
    assert (limits.max_model_len, limits.max_input_tokens, limits.limited_by) == (4096, 1000, LIMITED_BY_SETTING)
    # 8193 tokens need 512 blocks: the last sampled token is never fed back.
    assert blocks_for(8193, 16) == 512
    assert resolve_context(8193, None, 32768, 512, 16, HINT).max_model_len == 8193
    with pytest.raises(ValueError) as caught:
        resolve_context(16384, None, model_limit=32768, num_kv_blocks=512, block_size=16, cache_size_hint=HINT)
    assert str(caught.value).startswith(
        "MAX_TOTAL_TOKENS=16384 does not fit the KV cache: one request that long needs 1024 blocks of 16 tokens, "
        f"the cache holds 512 (8192 tokens; {HINT}). Lower MAX_TOTAL_TOKENS to at most 8192"
    )


def test_input_limit_must_leave_room_for_a_new_token():
    with pytest.raises(ValueError, match="MAX_INPUT_TOKENS=8192 must be smaller than the total token limit 8192"):
        resolve_context(None, 8192, model_limit=32768, num_kv_blocks=512, block_size=16, cache_size_hint=HINT)
    with pytest.raises(ValueError, match="too few for a prompt and one new token"):
        resolve_context(None, None, model_limit=32768, num_kv_blocks=1, block_size=1, cache_size_hint=HINT)


def test_a_model_whose_every_layer_slides_is_not_limited_by_the_cache():
    """Mistral v0.1 (window 4096 on all 32 layers, 32768 positions) on the same 8192-token CPU cache: a request holds
    only its window and one 512-token prompt chunk (the blocks before are freed), so the model's limit stands."""
    window = dict(kv_window=4096, max_chunk_tokens=512)
    assert blocks_for(32768, 16, **window) == 289  # cdiv(4096 + 512, 16) + 1
    limits = resolve_context(None, None, 32768, 512, 16, HINT, **window)
    assert (limits.max_model_len, limits.limited_by) == (32768, LIMITED_BY_MODEL)
    assert resolve_context(32768, None, 32768, 512, 16, HINT, **window).max_model_len == 32768
    # A cache too small even for the window: the cache's own limit, as without one.
    small = resolve_context(None, None, 32768, 200, 16, HINT, **window)
    assert (small.max_model_len, small.limited_by) == (3200, LIMITED_BY_KV_CACHE)
