"""BlockManager: allocation, ref counts, prefix-cache hits and LRU eviction, with no model."""

from __future__ import annotations

import pytest

from model_handler.block_manager import BlockManager
from tests.model_handler.engine_factories import create_sequence

BS = 4


def admit(manager: BlockManager, seq, num_new_tokens: int | None = None, computed: bool = True) -> list[int]:
    """Admit a waiting sequence the way the scheduler does and, when `computed`, record the step as run
    (as update_from_output does); returns the cached blocks it reused."""
    cached = manager.match_prefix(seq)
    if num_new_tokens is None:
        num_new_tokens = seq.num_tokens - len(cached) * BS
    assert manager.can_allocate(seq, cached, num_new_tokens)
    manager.allocate(seq, cached, num_new_tokens)
    if computed:
        seq.num_computed_tokens += num_new_tokens
    return cached


def test_allocate_and_deallocate_return_every_block():
    manager = BlockManager(num_blocks=8, block_size=BS)
    seq = create_sequence(range(10, 20))  # 10 tokens -> 3 blocks
    admit(manager, seq)
    assert len(seq.block_table) == 3
    assert manager.num_free_blocks == 5
    assert all(manager.ref_counts[b] == 1 for b in seq.block_table)
    manager.deallocate(seq)
    assert seq.block_table == []
    assert manager.num_free_blocks == 8
    assert manager.ref_counts == [0] * 8


def test_may_append_adds_a_block_only_when_the_last_one_is_full():
    manager = BlockManager(num_blocks=8, block_size=BS)
    seq = create_sequence(range(10, 17))  # 7 tokens -> 2 blocks, one slot left
    admit(manager, seq)
    seq.num_computed_tokens = 7
    seq.token_ids.append(99)
    assert manager.can_append(seq, 1)
    manager.may_append(seq, 1)  # token 8 fills block 2
    assert len(seq.block_table) == 2
    seq.num_computed_tokens = 8
    seq.token_ids.append(98)
    manager.may_append(seq, 1)  # token 9 needs a third block
    assert len(seq.block_table) == 3
    assert manager.num_free_blocks == 5


def test_can_allocate_refuses_when_blocks_run_out():
    manager = BlockManager(num_blocks=3, block_size=BS)
    first = create_sequence(range(10, 18))  # 2 blocks
    admit(manager, first)
    second = create_sequence(range(50, 58))  # needs 2, only 1 left
    assert not manager.can_allocate(second, [], second.num_tokens)
    assert manager.can_allocate(second, [], BS)  # a one-block chunk still fits


def test_shared_prefix_reuses_blocks_and_counts_references():
    manager = BlockManager(num_blocks=16, block_size=BS)
    prefix = list(range(100, 112))  # 3 full blocks
    first = create_sequence(prefix + [1, 2])
    admit(manager, first)
    second = create_sequence(prefix + [3, 4, 5])
    cached = admit(manager, second, computed=False)
    assert cached == first.block_table[:3]
    assert second.block_table[:3] == first.block_table[:3]
    assert second.num_computed_tokens == 12 and second.num_cached_tokens == 12
    assert [manager.ref_counts[b] for b in first.block_table] == [2, 2, 2, 1]
    # The partial last blocks are private.
    assert first.block_table[3] != second.block_table[3]
    manager.deallocate(first)
    assert [manager.ref_counts[b] for b in second.block_table] == [1, 1, 1, 1]
    manager.deallocate(second)
    assert manager.num_free_blocks == 16


def test_fully_cached_prompt_still_computes_its_last_token():
    manager = BlockManager(num_blocks=16, block_size=BS)
    prompt = list(range(200, 208))  # exactly 2 blocks
    first = create_sequence(prompt)
    admit(manager, first)
    manager.deallocate(first)
    again = create_sequence(prompt)
    cached = admit(manager, again, computed=False)
    # Only the first block is reused: the block holding the last token is computed again, privately.
    assert len(cached) == 1
    assert again.num_computed_tokens == 4
    assert again.num_tokens - again.num_computed_tokens == 4


def test_freed_blocks_stay_cached_until_plain_blocks_run_out():
    manager = BlockManager(num_blocks=6, block_size=BS)
    old = create_sequence(list(range(300, 308)) + [1])  # 2 full blocks cached + 1 partial
    admit(manager, old)
    manager.deallocate(old)
    assert manager.num_cached_blocks == 2
    assert manager.num_free_blocks == 6
    # 4 blocks of unrelated work fit in the plain free blocks: the cache survives.
    other = create_sequence(range(400, 416))
    admit(manager, other)
    assert manager.num_cached_blocks == 2 + 4  # its own full blocks are cached too
    hit = create_sequence(list(range(300, 308)) + [2])
    assert len(manager.match_prefix(hit)) == 2
    manager.deallocate(other)


def test_eviction_is_least_recently_used():
    manager = BlockManager(num_blocks=4, block_size=BS)
    a = create_sequence(list(range(10, 14)) + [0])  # caches one block
    b = create_sequence(list(range(20, 24)) + [0])
    admit(manager, a)
    admit(manager, b)
    manager.deallocate(a)  # a's block freed first: least recently used
    manager.deallocate(b)
    assert manager.num_cached_blocks == 2
    # Needs all 4 blocks: the 2 plain ones first, then evicts a's cached block, then b's.
    big = create_sequence(range(500, 512))  # 3 blocks
    admit(manager, big)
    assert manager.match_prefix(create_sequence(list(range(10, 14)) + [0])) == []
    assert len(manager.match_prefix(create_sequence(list(range(20, 24)) + [0]))) == 1
    manager.deallocate(big)
    assert manager.num_free_blocks == 4


def test_claiming_a_free_cached_block_uses_up_a_free_block():
    manager = BlockManager(num_blocks=3, block_size=BS)
    a = create_sequence(list(range(10, 18)) + [0])  # 2 cached blocks + 1 partial
    admit(manager, a)
    manager.deallocate(a)
    b = create_sequence(list(range(10, 18)) + [5, 6, 7, 8, 9])  # reuses 2, needs 2 more: 4 > 3
    cached = manager.match_prefix(b)
    assert len(cached) == 2
    assert not manager.can_allocate(b, cached, b.num_tokens - 8)
    assert manager.can_allocate(b, cached, 4)


def test_prefix_caching_off_shares_nothing():
    manager = BlockManager(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    first = create_sequence(range(10, 19))
    admit(manager, first)
    second = create_sequence(range(10, 19))
    assert manager.match_prefix(second) == []
    assert manager.num_cached_blocks == 0


def test_bad_sizes_are_rejected():
    with pytest.raises(ValueError):
        BlockManager(num_blocks=0, block_size=16)


def test_blocks_freed_before_they_were_computed_are_not_cached():
    manager = BlockManager(num_blocks=8, block_size=BS)
    seq = create_sequence(range(10, 22))  # 12 tokens: 3 full blocks, registered when scheduled
    admit(manager, seq, computed=False)
    assert manager.num_cached_blocks == 3
    manager.deallocate(seq)  # preempted in the same schedule() call: the step never ran
    assert manager.num_cached_blocks == 0
    assert manager.match_prefix(create_sequence(range(10, 23))) == []
    # Once computed, the same blocks survive a free.
    seq = create_sequence(range(10, 22))
    admit(manager, seq)
    manager.deallocate(seq)
    assert manager.num_cached_blocks == 3
    assert len(manager.match_prefix(create_sequence(range(10, 23)))) == 3


# ---- sliding windows and cache salts ------------------------------------------------------------------


def test_blocks_wholly_outside_the_window_are_freed_as_the_sequence_advances():
    """Every layer slides (kv_window 6): once the next token's window starts past a block, the block goes back to
    the pool (cached, so another request with the prefix can still find it) and its entry reads -1."""
    manager = BlockManager(num_blocks=8, block_size=BS, kv_window=6)
    seq = create_sequence(range(10, 20))  # 10 tokens, 3 blocks
    admit(manager, seq)
    assert seq.num_computed_tokens == 10
    manager.drop_outside_window(seq)  # the next token (10) sees keys 5..10: block 0 (0..3) is dead, block 1 is not
    assert seq.block_table[0] == -1 and -1 not in seq.block_table[1:]
    assert manager.num_free_blocks == 6 and manager.num_cached_blocks == 2
    for token in range(20, 26):  # decode to 16 computed tokens: keys 11.. seen, blocks 1 (4..7) and 2 (8..11) dead
        seq.token_ids.append(token)
        manager.may_append(seq, 1)
        seq.num_computed_tokens += 1
        manager.drop_outside_window(seq)
    assert seq.block_table[:2] == [-1, -1] and seq.num_dropped_blocks == 2
    # a prefix hit on the dropped blocks: they were freed to the cache, not forgotten
    again = create_sequence(range(10, 20))
    assert len(manager.match_prefix(again)) == 2
    manager.deallocate(seq)
    assert manager.num_free_blocks == 8 and manager.ref_counts == [0] * 8


def test_without_a_kv_window_nothing_is_dropped():
    manager = BlockManager(num_blocks=8, block_size=BS)
    seq = create_sequence(range(10, 30))
    admit(manager, seq)
    manager.drop_outside_window(seq)
    assert -1 not in seq.block_table


def test_a_preempted_sequence_with_dropped_blocks_gives_back_the_rest_and_starts_over():
    manager = BlockManager(num_blocks=8, block_size=BS, kv_window=3, enable_prefix_caching=False)
    seq = create_sequence(range(10, 26))  # 16 tokens: 4 blocks
    admit(manager, seq)
    manager.drop_outside_window(seq)  # next token 16 sees keys 14..: blocks 0-2 dead
    assert seq.block_table[:3] == [-1, -1, -1] and manager.num_free_blocks == 7
    manager.deallocate(seq)
    assert manager.num_free_blocks == 8 and seq.num_dropped_blocks == 0 and seq.block_table == []
    admit(manager, seq)  # recomputed from its tokens
    assert -1 not in seq.block_table and len(seq.block_table) == 4


def test_sequences_with_different_cache_salts_share_no_blocks():
    """A long prompt under a length-dependent rope rotates its early tokens differently from a short one's: the
    same tokens, another KV."""
    manager = BlockManager(num_blocks=16, block_size=BS)
    first = create_sequence(range(10, 20))
    admit(manager, first)
    salted = create_sequence(range(10, 20))
    salted.cache_salt = 1
    assert manager.match_prefix(salted) == []
    assert len(manager.match_prefix(create_sequence(range(10, 20)))) == 2
