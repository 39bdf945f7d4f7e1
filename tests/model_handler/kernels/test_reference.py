"""The torch reference (the CPU attention path) against plain SDPA on each sequence's unpaged keys and values."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model_handler.kernels import reference

SCALE = 0.3


def sdpa_per_sequence(batch) -> torch.Tensor:
    """Causal SDPA of each sequence's new tokens over its context, read slot by slot from the cache."""
    block_size = batch.k_cache.shape[1]
    out = torch.empty_like(batch.query)
    starts = batch.query_start_loc.tolist()
    for i, seq_len in enumerate(batch.seq_lens.tolist()):
        q_len = starts[i + 1] - starts[i]
        if q_len == 0:
            continue
        pos = torch.arange(seq_len)
        slots = batch.block_tables[i, pos // block_size].long() * block_size + pos % block_size  # [S]
        k = batch.k_cache.flatten(0, 1)[slots].transpose(0, 1)  # [H_kv, S, D]
        v = batch.v_cache.flatten(0, 1)[slots].transpose(0, 1)
        q = batch.query[starts[i] : starts[i + 1]].transpose(0, 1)  # [H, q_len, D]
        mask = pos[None, :] <= torch.arange(seq_len - q_len, seq_len)[:, None]  # [q_len, S]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=SCALE, enable_gqa=True)  # [H, q_len, D]
        out[starts[i] : starts[i + 1]] = o.transpose(0, 1)
    return out


def run_reference(batch, block_tables=None) -> torch.Tensor:
    return reference.paged_attention(
        batch.query,
        batch.k_cache,
        batch.v_cache,
        batch.block_tables if block_tables is None else block_tables,
        batch.seq_lens,
        batch.query_start_loc,
        SCALE,
    )


ROW_BYTES = 2 * 3 * 16 * 2 * 32 * 4  # k and v x 3 blocks (48 tokens) x block 16 x 2 kv heads x dim 32 x fp32


@pytest.mark.parametrize("chunk_bytes", [1, 3 * ROW_BYTES, reference.DECODE_CHUNK_BYTES])
def test_decode_rows_in_chunks_match_sdpa(paged_batch, monkeypatch, chunk_bytes):
    # One row per chunk, three rows per chunk (the last chunk shorter), and the whole batch at once.
    monkeypatch.setattr(reference, "DECODE_CHUNK_BYTES", chunk_bytes)
    seq_lens = [1, 15, 16, 17, 33, 48, 5]
    batch = paged_batch([1] * len(seq_lens), seq_lens, num_heads=4, num_kv_heads=2)
    torch.testing.assert_close(run_reference(batch), sdpa_per_sequence(batch), atol=2e-6, rtol=0)


def test_decode_rows_work_in_and_out_of_inference_mode_in_turn(paged_batch):
    """The reused scratch buffer: one made under inference mode cannot be written outside it (the engine runs in
    inference mode; tests, tools and the benchmarks may call the path either way in one process)."""
    batch = paged_batch([1, 1], [40, 17], num_heads=4, num_kv_heads=2, seed=5)
    expected = sdpa_per_sequence(batch)
    with torch.inference_mode():
        inside = run_reference(batch)
    torch.testing.assert_close(run_reference(batch), expected, atol=2e-6, rtol=0)
    torch.testing.assert_close(inside, expected, atol=2e-6, rtol=0)


def test_decode_chunks_group_rows_of_similar_length(paged_batch, monkeypatch):
    """Rows are chunked shortest first, so short rows are not padded to the step's longest."""
    monkeypatch.setattr(reference, "DECODE_CHUNK_BYTES", 26 * (ROW_BYTES // 3))  # 26 blocks of keys and values
    seq_lens = [200, 20, 190, 30, 100]
    batch = paged_batch([1] * len(seq_lens), seq_lens, num_heads=4, num_kv_heads=2)
    plan = reference.build_plan(batch.block_tables, batch.seq_lens, batch.query_start_loc, batch.k_cache)
    # Lengths 20, 30, 100 fit 3 x 7 blocks; 190 would make it 4 x 12: a new chunk, padded to 13 blocks, not all.
    assert [chunk.token_idx.tolist() for chunk in plan.decode] == [[1, 3, 4], [2, 0]]
    assert [chunk.num_blocks for chunk in plan.decode] == [7, 13]  # block size 16
    torch.testing.assert_close(run_reference(batch), sdpa_per_sequence(batch), atol=2e-6, rtol=0)


def test_decode_rows_between_prefill_rows_match_sdpa(paged_batch, monkeypatch):
    monkeypatch.setattr(reference, "DECODE_CHUNK_BYTES", 1)  # decode rows, a chunk each, at scattered tokens
    batch = paged_batch([3, 1, 5, 1, 1, 0, 20], [3, 40, 21, 16, 9, 4, 20], num_heads=8, num_kv_heads=2)
    out = run_reference(batch)
    expected = sdpa_per_sequence(batch)
    torch.testing.assert_close(out, expected, atol=2e-6, rtol=0)


def test_table_entries_past_a_sequence_are_ignored(paged_batch):
    batch = paged_batch([1, 1, 2], [5, 40, 18], num_heads=4, num_kv_heads=4)
    expected = run_reference(batch)
    tables = batch.block_tables.clone()
    tables[0, 1:] = -1  # other callers pad with -1 or stale ids; only the first block is the sequence's
    tables[2, 2:] = 10**6
    torch.testing.assert_close(run_reference(batch, tables), expected, atol=0, rtol=0)


def test_backend_builds_one_plan_per_step_and_every_layer_reuses_it(paged_batch):
    from model_handler.kernels import TorchReferenceBackend

    backend = TorchReferenceBackend()
    batch = paged_batch([1, 3, 1], [20, 40, 7], num_heads=4, num_kv_heads=2)
    metadata = batch.metadata()
    first_layer = backend.attention(batch.query, batch.k_cache, batch.v_cache, metadata, SCALE)
    plan = metadata.backend_plan
    assert plan is not None and plan.decode is not None and len(plan.prefills) == 1
    second_layer = backend.attention(batch.query, batch.k_cache, batch.v_cache, metadata, SCALE)
    assert metadata.backend_plan is plan
    torch.testing.assert_close(first_layer, sdpa_per_sequence(batch), atol=2e-6, rtol=0)
    torch.testing.assert_close(second_layer, first_layer, atol=0, rtol=0)
    # The next step comes with new metadata, so it can never see this step's plan.
    assert batch.metadata().backend_plan is None
