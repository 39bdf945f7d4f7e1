"""Triton paged attention against `reference.paged_attention` and plain SDPA (interpreter on CPU)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from model_handler.kernels import reference
from model_handler.kernels.triton_attention import paged_attention, tile_config
from model_handler.kernels.triton_kv_store import store_kv
from tests.model_handler.kernels.test_reference import WINDOW_CASES, drop_blocks_before_windows

TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}
SCALE = 0.3


def small_tiles(head_dim: int, dtype: torch.dtype, tile_n: int = 16, block_m: int = 8):
    """Tiles far below the block and prompt sizes, so tiny tests still cross tile and program edges."""
    on_gpu = torch.cuda.is_available()
    return dataclasses.replace(tile_config(head_dim, dtype, on_gpu), tile_n=tile_n, block_m=block_m)


def run_triton(batch, num_splits=1, config=None, out=None, k_cache=None, v_cache=None, **options):
    return paged_attention(
        batch.query,
        batch.k_cache if k_cache is None else k_cache,
        batch.v_cache if v_cache is None else v_cache,
        batch.block_tables,
        batch.seq_lens,
        batch.query_start_loc,
        SCALE,
        batch.max_query_len,
        out=out,
        num_splits=num_splits,
        config=config,
        **options,
    )


def run_reference(batch, **options):
    """The oracle in fp32 on the same (already rounded) inputs."""
    return reference.paged_attention(
        batch.query.float(),
        batch.k_cache.float(),
        batch.v_cache.float(),
        batch.block_tables,
        batch.seq_lens,
        batch.query_start_loc,
        SCALE,
        **options,
    )


def assert_close(actual, expected, dtype):
    err = (actual.float() - expected).abs().max().item()
    assert err <= TOLERANCE[dtype], f"max abs error {err} > {TOLERANCE[dtype]}"


@pytest.mark.parametrize("num_heads,num_kv_heads", [(2, 2), (4, 2), (4, 1), (8, 1)])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_matches_reference_for_gqa_ratios(paged_batch, poison, num_heads, num_kv_heads, num_splits):
    # Lengths at, just before and just after block (16) and tile (16) edges.
    seq_lens = [1, 15, 16, 17, 33, 48]
    batch = paged_batch([1] * len(seq_lens), seq_lens, num_heads, num_kv_heads, seed=num_heads + num_splits)
    expected = run_reference(batch)
    # NaN in every slot outside the contexts: a read past a sequence's end would surface.
    out = run_triton(
        batch,
        num_splits,
        small_tiles(32, torch.float32),
        k_cache=poison(batch.k_cache, batch.used_slots),
        v_cache=poison(batch.v_cache, batch.used_slots),
    )
    assert_close(out, expected, torch.float32)


def test_decode_split_count_does_not_change_the_result(paged_batch):
    batch = paged_batch([1, 1], [7, 150], num_heads=4, num_kv_heads=2, block_size=8)
    one = run_triton(batch, 1, small_tiles(32, torch.float32))
    # 5 splits of 150 keys in tiles of 16: some splits are empty for the 7-key sequence.
    many = run_triton(batch, 5, small_tiles(32, torch.float32))
    assert_close(many, one, torch.float32)
    assert_close(one, run_reference(batch), torch.float32)


@pytest.mark.parametrize(
    "q_lens,seq_lens",
    [
        ([5, 20], [5, 20]),  # plain prefill, no cached prefix
        ([3, 17, 2], [19, 40, 16]),  # extend: new tokens after a cached prefix, crossing blocks
        ([16, 9], [32, 9]),  # prompt ending exactly on a block edge
    ],
)
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (8, 2)])
def test_prefill_and_extend_match_reference(paged_batch, poison, q_lens, seq_lens, num_heads, num_kv_heads):
    batch = paged_batch(q_lens, seq_lens, num_heads, num_kv_heads, seed=sum(seq_lens))
    out = run_triton(
        batch,
        config=small_tiles(32, torch.float32),
        k_cache=poison(batch.k_cache, batch.used_slots),
        v_cache=poison(batch.v_cache, batch.used_slots),
    )
    assert_close(out, run_reference(batch), torch.float32)


def test_mixed_decode_and_prefill_rows_in_one_call(paged_batch):
    q_lens, seq_lens = [1, 12, 1, 30, 1], [40, 12, 1, 45, 17]
    batch = paged_batch(q_lens, seq_lens, num_heads=4, num_kv_heads=2, seed=3)
    out = torch.full_like(batch.query, float("nan"))
    run_triton(batch, num_splits=2, config=small_tiles(32, torch.float32), out=out)
    assert not out.isnan().any(), "a real row was left unwritten"
    assert_close(out, run_reference(batch), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(paged_batch, dtype):
    batch = paged_batch([1, 9, 1], [70, 25, 16], num_heads=8, num_kv_heads=2, head_dim=64, dtype=dtype)
    out = run_triton(batch, num_splits=2)  # default tiles
    assert out.dtype == dtype
    assert_close(out, run_reference(batch), dtype)


def test_default_tiles_and_splits(paged_batch):
    batch = paged_batch([1, 1, 70], [200, 3, 130], num_heads=4, num_kv_heads=2, head_dim=16)
    out = run_triton(batch, num_splits=None)
    assert_close(out, run_reference(batch), torch.float32)


def test_head_dim_not_a_power_of_two(paged_batch):
    batch = paged_batch([1, 6], [21, 30], num_heads=2, num_kv_heads=1, head_dim=48)
    assert_close(run_triton(batch, num_splits=2), run_reference(batch), torch.float32)


def test_padding_rows_give_finite_output_and_real_rows_are_written(paged_batch):
    # A CUDA-graph decode batch: two real rows, then padding with seq_len 0 and with seq_len 1 at block 0.
    batch = paged_batch([1, 1], [30, 5], num_heads=4, num_kv_heads=2)
    num_seqs = 4
    seq_lens = torch.tensor([30, 5, 0, 1], dtype=torch.int32, device=batch.seq_lens.device)
    tables = torch.zeros(num_seqs, batch.block_tables.shape[1], dtype=torch.int32, device=seq_lens.device)
    tables[:2] = batch.block_tables
    query = torch.cat([batch.query, torch.randn(2, 4, 32, device=batch.query.device)])  # [4, 4, 32]
    qsl = torch.arange(num_seqs + 1, dtype=torch.int32, device=seq_lens.device)
    for num_splits in (1, 4):
        out = torch.full_like(query, float("nan"))
        paged_attention(
            query, batch.k_cache, batch.v_cache, tables, seq_lens, qsl, SCALE, 1, out, num_splits=num_splits
        )
        assert torch.isfinite(out).all()
        assert (out[2] == 0).all(), "an empty context must give zeros"
        assert_close(out[:2], run_reference(batch), torch.float32)


def test_strided_query_and_out_views(paged_batch):
    batch = paged_batch([4, 1], [20, 9], num_heads=4, num_kv_heads=2)
    fused = torch.randn(batch.query.shape[0], 8, 32, device=batch.query.device)  # [tokens, q + spare heads, D]
    fused[:, 2:6] = batch.query
    query = fused[:, 2:6]  # a view with token stride 8 * 32
    out_storage = torch.full((batch.query.shape[0], 6, 32), float("nan"), device=query.device)
    out = out_storage[:, 1:5]
    paged_attention(
        query,
        batch.k_cache,
        batch.v_cache,
        batch.block_tables,
        batch.seq_lens,
        batch.query_start_loc,
        SCALE,
        batch.max_query_len,
        out,
        num_splits=2,
    )
    assert_close(out, run_reference(batch), torch.float32)
    assert out_storage[:, 0].isnan().all() and out_storage[:, 5].isnan().all(), "wrote outside the out view"


def test_store_then_attend_matches_sdpa_on_unpaged_tensors(paged_batch):
    """End to end: new keys go in with the Triton store, attention reads them back through the pages."""
    q_lens, seq_lens = [6, 1, 11], [6, 23, 29]
    num_heads, num_kv_heads, head_dim = 4, 2, 32
    batch = paged_batch(q_lens, seq_lens, num_heads, num_kv_heads, head_dim, block_size=8, seed=11)
    gen = torch.Generator().manual_seed(5)
    keys = [torch.randn(s, num_kv_heads, head_dim, generator=gen).to(batch.query.device) for s in seq_lens]
    values = [torch.randn(s, num_kv_heads, head_dim, generator=gen).to(batch.query.device) for s in seq_lens]
    # The cached prefixes go in first, then this step's new tokens, both through the Triton store.
    for i, seq_len in enumerate(seq_lens):
        pos = torch.arange(seq_len, device=batch.query.device)
        blocks = batch.block_tables[i, pos // 8].long()
        store_kv(keys[i], values[i], batch.k_cache, batch.v_cache, blocks * 8 + pos % 8)
    out = run_triton(batch, num_splits=2, config=small_tiles(head_dim, torch.float32))
    starts = batch.query_start_loc.tolist()
    for i, (q_len, seq_len) in enumerate(zip(q_lens, seq_lens)):
        q = batch.query[starts[i] : starts[i] + q_len].transpose(0, 1)  # [H, q_len, D]
        k = keys[i].transpose(0, 1).repeat_interleave(num_heads // num_kv_heads, 0)  # [H, S, D]
        v = values[i].transpose(0, 1).repeat_interleave(num_heads // num_kv_heads, 0)
        mask = torch.ones(q_len, seq_len, dtype=torch.bool, device=q.device).tril(seq_len - q_len)  # [q_len, S]
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=SCALE).transpose(0, 1)
        assert_close(out[starts[i] : starts[i] + q_len], expected, torch.float32)


@pytest.mark.parametrize("case", sorted(WINDOW_CASES))
@pytest.mark.parametrize("sliding_window", [1, 5, 16, 40])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_sliding_windows_match_reference_and_skip_freed_blocks(paged_batch, case, sliding_window, num_splits):
    """Windows of one token, inside a tile (16), one block and longer than most contexts, decode rows split across
    programs, prompts and chunks: blocks wholly before the windows have table entries of -1 and the slots before
    them hold NaN, as the block manager leaves freed blocks, so a read of either would show."""
    q_lens, seq_lens = WINDOW_CASES[case]
    batch = paged_batch(q_lens, seq_lens, num_heads=4, num_kv_heads=2, seed=sliding_window + num_splits)
    expected = run_reference(batch, sliding_window=sliding_window)
    freed = drop_blocks_before_windows(batch, sliding_window)
    out = run_triton(freed, num_splits, small_tiles(32, torch.float32), sliding_window=sliding_window)
    assert_close(out, expected, torch.float32)


@pytest.mark.parametrize("sliding_window", [None, 7])
def test_soft_capped_logits_match_reference(paged_batch, sliding_window):
    """Gemma 2's attention: logits capped with cap * tanh(s / cap), with and without its window."""
    batch = paged_batch([1, 12, 1, 30, 1], [40, 12, 1, 45, 17], num_heads=4, num_kv_heads=2, seed=9)
    batch.query = batch.query * 8  # logits well past the cap of 5, so capping changes the result
    options = dict(sliding_window=sliding_window, softcap=5.0)
    expected = run_reference(batch, **options)
    assert not torch.allclose(expected, run_reference(batch, sliding_window=sliding_window), atol=1e-2)
    assert_close(run_triton(batch, 2, small_tiles(32, torch.float32), **options), expected, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_window_and_cap_in_half_precision_with_default_tiles(paged_batch, dtype):
    batch = paged_batch([1, 9, 1], [70, 25, 16], num_heads=8, num_kv_heads=2, head_dim=64, dtype=dtype)
    options = dict(sliding_window=20, softcap=30.0)
    assert_close(run_triton(batch, num_splits=2, **options), run_reference(batch, **options), dtype)


def test_empty_batch_returns_out_untouched(paged_batch):
    batch = paged_batch([1], [4])
    query = batch.query[:0]
    seq_lens = batch.seq_lens[:0]
    out = paged_attention(
        query, batch.k_cache, batch.v_cache, batch.block_tables[:0], seq_lens, batch.query_start_loc[:1], SCALE, 0
    )
    assert out.shape == (0, 4, 32)


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda b: {"seq_lens": b.seq_lens.long()}, "seq_lens must be int32"),
        (lambda b: {"query_start_loc": b.query_start_loc[:-1]}, "query_start_loc must be int32 of shape"),
        (lambda b: {"block_tables": b.block_tables.long()}, "block_tables must be int32"),
        (lambda b: {"query": b.query[:, :3]}, "multiple of num_kv_heads"),
        (lambda b: {"query": b.query[..., :16]}, "head_dim 16 must match"),
        (lambda b: {"query": b.query.int()}, "query dtype torch.int32 is not supported"),
        (lambda b: {"v_cache": b.v_cache[:, :8]}, "k_cache and v_cache must both be"),
        (lambda b: {"k_cache": b.k_cache.transpose(2, 3)}, "k_cache and v_cache must both be"),
        (lambda b: {"out": torch.empty_like(b.query)[:, :, :16]}, "out must have the query's shape"),
        (lambda b: {"query": b.query.transpose(1, 2).contiguous().transpose(1, 2)}, "contiguous in head_dim"),
        (lambda b: {"num_splits": 0}, "num_splits must be in 1..256"),
        (lambda b: {"sliding_window": 0}, "sliding_window must be a positive"),
        (lambda b: {"softcap": 0.0}, "softcap must be positive"),
    ],
)
def test_bad_inputs_raise_value_error(paged_batch, change, message):
    batch = paged_batch([1, 3], [5, 9])
    args = dict(
        query=batch.query,
        k_cache=batch.k_cache,
        v_cache=batch.v_cache,
        block_tables=batch.block_tables,
        seq_lens=batch.seq_lens,
        query_start_loc=batch.query_start_loc,
        scale=SCALE,
        max_query_len=3,
    )
    args.update(change(batch))
    with pytest.raises(ValueError, match=message):
        paged_attention(**args)
