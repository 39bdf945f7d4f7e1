"""The torch reference (the CPU attention path) against plain SDPA on each sequence's unpaged keys and values."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model_handler.kernels import reference

SCALE = 0.3


def sdpa_per_sequence(batch, sliding_window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """Causal SDPA of each sequence's new tokens over its context, read slot by slot from the cache; with a window,
    position p sees keys p - window < k <= p only; with a soft-cap, in explicit steps as transformers' eager
    attention (cap * tanh(logits / cap), then the fp32 softmax)."""
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
        q_pos = torch.arange(seq_len - q_len, seq_len)[:, None]  # [q_len, 1]
        mask = pos[None, :] <= q_pos  # [q_len, S]
        if sliding_window is not None:
            mask &= pos[None, :] > q_pos - sliding_window
        if softcap is None:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=SCALE, enable_gqa=True)  # [H, q_len, D]
        else:
            group = q.shape[0] // k.shape[0]
            k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)  # [H, S, D]
            logits = torch.tanh(q @ k.transpose(1, 2) * SCALE / softcap) * softcap  # [H, q_len, S]
            o = torch.softmax(logits.masked_fill(~mask, float("-inf")), -1, dtype=torch.float32).to(q.dtype) @ v
        out[starts[i] : starts[i + 1]] = o.transpose(0, 1)
    return out


def first_keys(batch, sliding_window: int) -> list[int]:
    """Per sequence, the earliest key any of its new tokens sees through the window."""
    starts, lens = batch.query_start_loc.tolist(), batch.seq_lens.tolist()
    return [max(0, lens[i] - (starts[i + 1] - starts[i]) - sliding_window + 1) for i in range(len(lens))]


def drop_blocks_before_windows(batch, sliding_window: int, nan_slots: bool = True):
    """A copy of `batch` as the engine leaves it once the block manager frees blocks outside the window: the table
    entries of blocks wholly before every new token's window point nowhere (-1), and (with `nan_slots`) every
    cache slot before a sequence's earliest window key holds NaN, so a kernel reading either would show."""
    block_size = batch.k_cache.shape[1]
    tables = batch.block_tables.clone()
    k_cache, v_cache = batch.k_cache.clone(), batch.v_cache.clone()
    for i, first in enumerate(first_keys(batch, sliding_window)):
        if nan_slots and first:
            pos = torch.arange(first)
            slots = batch.block_tables[i, pos // block_size].long() * block_size + pos % block_size
            k_cache.flatten(0, 1)[slots] = float("nan")
            v_cache.flatten(0, 1)[slots] = float("nan")
        tables[i, : first // block_size] = -1
    return type(batch)(
        batch.query,
        k_cache,
        v_cache,
        tables,
        batch.seq_lens,
        batch.query_start_loc,
        batch.slot_mapping,
        batch.used_slots,
    )


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


def test_backend_builds_one_plan_per_step_and_window_and_every_layer_reuses_it(paged_batch):
    from model_handler.kernels import TorchReferenceBackend

    backend = TorchReferenceBackend()
    batch = paged_batch([1, 3, 1], [20, 40, 7], num_heads=4, num_kv_heads=2)
    metadata = batch.metadata()
    first_layer = backend.attention(batch.query, batch.k_cache, batch.v_cache, metadata, SCALE)
    plan = metadata.backend_plan[None]
    assert plan.decode is not None and len(plan.prefills) == 1
    second_layer = backend.attention(batch.query, batch.k_cache, batch.v_cache, metadata, SCALE)
    assert metadata.backend_plan[None] is plan
    torch.testing.assert_close(first_layer, sdpa_per_sequence(batch), atol=2e-6, rtol=0)
    torch.testing.assert_close(second_layer, first_layer, atol=0, rtol=0)
    # A layer with a window (Gemma 2's alternate layers) gets its own plan, shared by the layers with that window.
    windowed = backend.attention(batch.query, batch.k_cache, batch.v_cache, metadata, SCALE, sliding_window=8)
    assert set(metadata.backend_plan) == {None, 8} and metadata.backend_plan[None] is plan
    torch.testing.assert_close(windowed, sdpa_per_sequence(batch, sliding_window=8), atol=2e-6, rtol=0)
    # The next step comes with new metadata, so it can never see this step's plan.
    assert batch.metadata().backend_plan is None


WINDOW_CASES = {
    # decode rows around block (16) edges, inside and past a window of 5 and of 16 (one block)
    "decode": ([1] * 7, [1, 5, 6, 16, 17, 33, 50]),
    # whole prompts and chunks after cached prefixes, longer and shorter than the window
    "prefill": ([20, 3, 17, 2, 9], [20, 19, 40, 16, 9]),
    "mixed": ([1, 12, 1, 30, 1], [40, 12, 1, 45, 17]),
}


@pytest.mark.parametrize("case", sorted(WINDOW_CASES))
@pytest.mark.parametrize("sliding_window", [1, 5, 16, 64])
@pytest.mark.parametrize("softcap", [None, 2.0])
def test_windows_and_soft_caps_match_the_explicit_formula(paged_batch, monkeypatch, case, sliding_window, softcap):
    """Windows of one token, inside a block, one block and longer than every context; logits soft-capped or not;
    blocks wholly before every window unreadable (table entries of -1), as the block manager leaves them."""
    monkeypatch.setattr(reference, "DECODE_CHUNK_BYTES", 3 * ROW_BYTES)  # several decode chunks
    q_lens, seq_lens = WINDOW_CASES[case]
    batch = paged_batch(q_lens, seq_lens, num_heads=4, num_kv_heads=2, seed=sliding_window)
    batch.query = batch.query * 4  # logits of several units, so the cap of 2 changes them
    expected = sdpa_per_sequence(batch, sliding_window, softcap)
    freed = drop_blocks_before_windows(batch, sliding_window, nan_slots=False)
    out = reference.paged_attention(
        freed.query,
        freed.k_cache,
        freed.v_cache,
        freed.block_tables,
        freed.seq_lens,
        freed.query_start_loc,
        SCALE,
        sliding_window=sliding_window,
        softcap=softcap,
    )
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    if softcap is not None and sliding_window > 1:  # (one key: the softmax is 1 whatever the logit)
        assert not torch.allclose(expected, sdpa_per_sequence(batch, sliding_window), atol=1e-3)  # the cap matters


def test_a_window_reads_only_the_blocks_it_spans(paged_batch):
    """Decode rows with a window gather from the block holding their window's first key, not from block 0."""
    batch = paged_batch([1, 1], [100, 40], num_heads=4, num_kv_heads=2)  # block size 16
    plan = reference.build_plan(batch.block_tables, batch.seq_lens, batch.query_start_loc, batch.k_cache, 20)
    [chunk] = plan.decode
    # keys 80..99 (blocks 5, 6) and 20..39 (blocks 1, 2): two blocks each instead of seven and three
    assert chunk.num_blocks == 2
    assert chunk.mask.sum().item() == 40
