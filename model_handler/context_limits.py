"""The token limits of one request, settled once the KV cache is sized: MAX_TOTAL_TOKENS and MAX_INPUT_TOKENS.

As TGI 3 does, an unset MAX_TOTAL_TOKENS is the smaller of the model's own limit (max_position_embeddings) and
what the KV cache holds, so one request may use the whole cache (the scheduler preempts others to make room);
MAX_INPUT_TOKENS defaults to one less. A value set larger than the cache holds stops start-up with the numbers.
When every layer has a sliding window, a request holds only the blocks its window and one prompt chunk span (the
block manager frees the ones before), so the cache limits the context only if not even those fit.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

logger = logging.getLogger(__name__)

LIMITED_BY_MODEL = "model"
LIMITED_BY_KV_CACHE = "kv_cache"
LIMITED_BY_SETTING = "MAX_TOTAL_TOKENS"


@dataclass(slots=True, frozen=True)
class ContextLimits:
    max_model_len: int
    """Prompt + generated tokens of one request (MAX_TOTAL_TOKENS)."""
    max_input_tokens: int
    """Longest prompt (MAX_INPUT_TOKENS)."""
    model_limit: int
    """The model's max_position_embeddings."""
    kv_cache_tokens: int
    """Tokens the whole KV cache holds."""
    limited_by: str
    """What set max_model_len: LIMITED_BY_MODEL, LIMITED_BY_KV_CACHE or LIMITED_BY_SETTING."""


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def blocks_for(total_tokens: int, block_size: int, kv_window: int | None = None, max_chunk_tokens: int = 0) -> int:
    """KV blocks one request of `total_tokens` needs at once: its last sampled token is never fed back, so needs no
    slot (the engine admits requests by the same count); with `kv_window` (every layer slides), no more than the
    window and a prompt chunk of `max_chunk_tokens` span."""
    needed = _cdiv(total_tokens - 1, block_size)
    if kv_window is not None:
        needed = min(needed, _cdiv(kv_window + max_chunk_tokens, block_size) + 1)
    return needed


def resolve_context(
    requested_total: int | None,
    requested_input: int | None,
    model_limit: int,
    num_kv_blocks: int,
    block_size: int,
    cache_size_hint: str,
    kv_window: int | None = None,
    max_chunk_tokens: int = 0,
) -> ContextLimits:
    """The limits from what was asked (None: unset) and what the model and the cache allow. `cache_size_hint`
    says which setting sized the cache, for the error message; `kv_window` and `max_chunk_tokens` as in
    `blocks_for`."""
    kv_cache_tokens = num_kv_blocks * block_size
    if requested_total is None and kv_window is not None:
        fits = blocks_for(model_limit, block_size, kv_window, max_chunk_tokens) <= num_kv_blocks
        max_model_len = model_limit if fits else min(model_limit, kv_cache_tokens)
        limited_by = LIMITED_BY_MODEL if fits or model_limit <= kv_cache_tokens else LIMITED_BY_KV_CACHE
    elif requested_total is None:
        max_model_len = min(model_limit, kv_cache_tokens)
        limited_by = LIMITED_BY_MODEL if model_limit <= kv_cache_tokens else LIMITED_BY_KV_CACHE
    else:
        needed = blocks_for(requested_total, block_size, kv_window, max_chunk_tokens)
        if needed > num_kv_blocks:
            raise ValueError(
                f"MAX_TOTAL_TOKENS={requested_total} does not fit the KV cache: one request that long needs {needed} "
                f"blocks of {block_size} tokens, the cache holds {num_kv_blocks} ({kv_cache_tokens} tokens; "
                f"{cache_size_hint}). Lower MAX_TOTAL_TOKENS to at most {kv_cache_tokens}, unset it to size it from "
                "the cache, or give the cache more memory"
            )
        max_model_len, limited_by = requested_total, LIMITED_BY_SETTING
    if max_model_len < 2:
        raise ValueError(f"the KV cache holds {kv_cache_tokens} tokens: too few for a prompt and one new token")
    if requested_input is None:
        max_input_tokens = max_model_len - 1
    elif requested_input >= max_model_len:
        raise ValueError(
            f"MAX_INPUT_TOKENS={requested_input} must be smaller than the total token limit {max_model_len} "
            f"(limited by {limited_by}: the model allows {model_limit} tokens, the KV cache holds {kv_cache_tokens}; "
            f"{cache_size_hint})"
        )
    else:
        max_input_tokens = requested_input
    return ContextLimits(max_model_len, max_input_tokens, model_limit, kv_cache_tokens, limited_by)


def log_context(context: ContextLimits, num_kv_blocks: int, block_size: int, kv_cache_bytes: int) -> None:
    """The start-up line that states both limits and why they are what they are."""
    logger.info(
        "KV cache: %d blocks of %d tokens (%.1f MiB, %d tokens); MAX_TOTAL_TOKENS=%d (limited by %s: the model "
        "allows %d, the cache holds %d), MAX_INPUT_TOKENS=%d",
        num_kv_blocks,
        block_size,
        kv_cache_bytes / 2**20,
        context.kv_cache_tokens,
        context.max_model_len,
        context.limited_by,
        context.model_limit,
        context.kv_cache_tokens,
        context.max_input_tokens,
        extra={
            "num_kv_blocks": num_kv_blocks,
            "kv_cache_bytes": kv_cache_bytes,
            "kv_cache_tokens": context.kv_cache_tokens,
            "max_total_tokens": context.max_model_len,
            "max_input_tokens": context.max_input_tokens,
            "model_max_position_embeddings": context.model_limit,
            "max_total_tokens_limited_by": context.limited_by,
        },
    )
