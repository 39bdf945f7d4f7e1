"""Paged attention and KV-cache stores in plain torch: the CPU path and the oracle for the Triton kernels.

Layout shared by every backend:
  k_cache, v_cache   [num_blocks, block_size, num_kv_heads, head_dim]
  slot_mapping       [num_tokens] int64, slot = block_id * block_size + offset; a negative slot is skipped
  block_tables       [num_seqs, max_blocks_per_seq] int32, unused entries are ignored
  seq_lens           [num_seqs] int32, context length after this step (cached + new tokens)
  query_start_loc    [num_seqs + 1] int32, cumulative query lengths: the new tokens of sequence i are
                     query[query_start_loc[i]:query_start_loc[i + 1]]
The new tokens of a sequence are its last ones, so query token j of sequence i sits at position
seq_lens[i] - q_len_i + j and attends causally to keys 0..that position.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def store_kv(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [num_tokens] int64
) -> None:
    """Write each new token's key and value into its cache slot."""
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    k_flat = k_cache.view(-1, num_kv_heads, head_dim)  # [num_slots, num_kv_heads, head_dim]
    v_flat = v_cache.view(-1, num_kv_heads, head_dim)
    num_tokens = slot_mapping.shape[0]
    key, value = key[:num_tokens], value[:num_tokens]
    if bool((slot_mapping < 0).any()):
        keep = slot_mapping >= 0
        slot_mapping, key, value = slot_mapping[keep], key[keep], value[keep]
    k_flat.index_copy_(0, slot_mapping, key.to(k_cache.dtype))
    v_flat.index_copy_(0, slot_mapping, value.to(v_cache.dtype))


def gather_kv(
    cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_table: torch.Tensor,  # [num_blocks_used] int
    seq_len: int,
) -> torch.Tensor:
    """The first `seq_len` cached tokens of one sequence, contiguous: [seq_len, num_kv_heads, head_dim]."""
    block_size = cache.shape[1]
    num_blocks = (seq_len + block_size - 1) // block_size
    blocks = cache[block_table[:num_blocks].long()]  # [num_blocks, block_size, H_kv, D]
    return blocks.reshape(-1, cache.shape[2], cache.shape[3])[:seq_len]


def paged_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    scale: float,
    out: torch.Tensor | None = None,  # [num_tokens, num_heads, head_dim]
) -> torch.Tensor:
    """Causal attention of the new tokens over each sequence's paged context (new tokens already stored).

    Decode rows (one query token) are done together in one padded SDPA call; longer queries one
    sequence at a time. Host syncs are fine here: this path runs on CPU or as a test oracle.
    """
    if out is None:
        out = torch.empty_like(query)
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    num_seqs = len(lens)
    decode_rows = [i for i in range(num_seqs) if starts[i + 1] - starts[i] == 1]
    if decode_rows:
        _decode_batch(query, k_cache, v_cache, block_tables, seq_lens, starts, decode_rows, scale, out)
    for i in range(num_seqs):
        q_len = starts[i + 1] - starts[i]
        if q_len <= 1:
            continue
        _prefill_one(query, k_cache, v_cache, block_tables[i], lens[i], starts[i], q_len, scale, out)
    return out


def _decode_batch(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    starts: list[int],
    rows: list[int],
    scale: float,
    out: torch.Tensor,
) -> None:
    """One padded SDPA over every single-token query: gather whole blocks, mask past each length."""
    num_heads, head_dim = query.shape[1], query.shape[2]
    block_size = k_cache.shape[1]
    rows_t = torch.tensor(rows, dtype=torch.long, device=query.device)
    token_idx = torch.tensor([starts[i] for i in rows], dtype=torch.long, device=query.device)
    lens = seq_lens.to(query.device).long()[rows_t]  # [B]
    max_len = int(lens.max())
    num_blocks = (max_len + block_size - 1) // block_size
    tables = block_tables[rows_t, :num_blocks].long()  # [B, nb]
    keys = k_cache[tables].flatten(1, 2)  # [B, nb * block_size, H_kv, D]
    values = v_cache[tables].flatten(1, 2)
    mask = torch.arange(keys.shape[1], device=query.device)[None, :] < lens[:, None]  # [B, S]
    q = query[token_idx].unsqueeze(2)  # [B, H, 1, D]
    o = F.scaled_dot_product_attention(
        q,
        keys.transpose(1, 2).to(q.dtype),  # [B, H_kv, S, D]
        values.transpose(1, 2).to(q.dtype),
        attn_mask=mask[:, None, None, :],  # [B, 1, 1, S]
        scale=scale,
        enable_gqa=True,
    )  # [B, H, 1, D]
    out[token_idx] = o.view(len(rows), num_heads, head_dim)


def _prefill_one(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_len: int,
    start: int,
    q_len: int,
    scale: float,
    out: torch.Tensor,
) -> None:
    """Causal SDPA of one sequence's q_len new tokens over its seq_len cached tokens."""
    q = query[start : start + q_len].transpose(0, 1).unsqueeze(0)  # [1, H, q_len, D]
    k = gather_kv(k_cache, block_table, seq_len).transpose(0, 1).unsqueeze(0).to(q.dtype)  # [1, H_kv, S, D]
    v = gather_kv(v_cache, block_table, seq_len).transpose(0, 1).unsqueeze(0).to(q.dtype)
    context_len = seq_len - q_len
    q_pos = torch.arange(context_len, seq_len, device=query.device)[:, None]  # [q_len, 1]
    k_pos = torch.arange(seq_len, device=query.device)[None, :]  # [1, S]
    mask = k_pos <= q_pos  # [q_len, S]
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)  # [1, H, q_len, D]
    out[start : start + q_len] = o[0].transpose(0, 1)
