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

import threading
from dataclasses import dataclass

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
    if key.shape[0] != num_tokens:
        key, value = key[:num_tokens], value[:num_tokens]
    if bool((slot_mapping < 0).any()):
        keep = slot_mapping >= 0
        slot_mapping, key, value = slot_mapping[keep], key[keep], value[keep]
    if key.dtype != k_cache.dtype:
        key, value = key.to(k_cache.dtype), value.to(v_cache.dtype)
    k_flat.index_copy_(0, slot_mapping, key)
    v_flat.index_copy_(0, slot_mapping, value)


def gather_kv(
    cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_table: torch.Tensor,  # [num_blocks_used] int
    seq_len: int,
) -> torch.Tensor:
    """The first `seq_len` cached tokens of one sequence, contiguous: [seq_len, num_kv_heads, head_dim]."""
    block_size = cache.shape[1]
    num_blocks = (seq_len + block_size - 1) // block_size
    blocks = cache.reshape(cache.shape[0], -1).index_select(0, block_table[:num_blocks].long())  # [nb, bs*H_kv*D]
    return blocks.view(-1, cache.shape[2], cache.shape[3])[:seq_len]


def paged_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    scale: float,
    out: torch.Tensor | None = None,  # [num_tokens, num_heads, head_dim]
    plan: StepPlan | None = None,
) -> torch.Tensor:
    """Causal attention of the new tokens over each sequence's paged context (new tokens already stored).

    Decode rows (one query token) are done in padded SDPA calls over chunks of rows of similar length; longer
    queries one sequence at a time. Host syncs are fine here: this path runs on CPU or as a test oracle. `plan`
    (from `build_plan` on the same metadata and cache) saves every layer after the first from rebuilding it.
    """
    if out is None:
        out = torch.empty_like(query)
    if plan is None:
        plan = build_plan(block_tables, seq_lens, query_start_loc, k_cache)
    for chunk in plan.decode:
        _decode_chunk(query, k_cache, v_cache, chunk, scale, out)
    for start, q_len, seq_len, row in plan.prefills:
        prefill_one(query, k_cache, v_cache, block_tables[row], seq_len, start, q_len, scale, out)
    return out


@dataclass(slots=True)
class _DecodeChunk:
    """Decode rows attended in one SDPA call: which query tokens, which blocks to gather, the mask."""

    token_idx: torch.Tensor  # [n] int64, the rows' query tokens
    gather_idx: torch.Tensor  # [n * num_blocks] int64, block ids to copy, row by row
    mask: torch.Tensor  # [n, 1, 1, num_blocks * block_size] bool, True where a key is inside the context
    num_blocks: int


@dataclass(slots=True)
class StepPlan:
    """How one step's rows split into decode chunks and prefills; built once per step, shared by all layers."""

    decode: list[_DecodeChunk]
    prefills: list[tuple[int, int, int, int]]  # (query start, q_len, seq_len, row) of longer queries


DECODE_CHUNK_BYTES = 4 << 20
"""Gathered keys + values per decode chunk: a few MiB stay in cache between the copy and the attention that
reads them (10-20% faster than the whole batch at once on a 2-core EPYC, bench/engine_step.py)."""


@dataclass(slots=True)
class RowSplit:
    """A step's sequences split into decode rows (one new token) and prompts or prompt chunks (several)."""

    starts: list[int]  # query_start_loc as a list
    lens: list[int]  # seq_lens as a list
    decode: list[int]  # sequences with one new token, in batch order
    prefills: list[tuple[int, int, int, int]]  # (query start, q_len, seq_len, row) of longer queries

    @classmethod
    def of(cls, seq_lens: torch.Tensor, query_start_loc: torch.Tensor) -> RowSplit:
        """Two host syncs; once per step."""
        starts = query_start_loc.tolist()
        lens = seq_lens.tolist()
        q_lens = [starts[i + 1] - starts[i] for i in range(len(lens))]
        prefills = [(starts[i], q_lens[i], lens[i], i) for i in range(len(lens)) if q_lens[i] > 1]
        return cls(starts, lens, [i for i in range(len(lens)) if q_lens[i] == 1], prefills)


def build_plan(
    block_tables: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor, k_cache: torch.Tensor
) -> StepPlan:
    """The step's row split and decode chunks (a few host syncs, once per step).

    Decode rows are taken shortest first, so each chunk is padded to the longest row of similar ones rather than
    to the longest of the step (32 rows of 128-384 tokens: a third of the gathered keys were padding; 12% less
    attention time measured, identical outputs).
    """
    split = RowSplit.of(seq_lens, query_start_loc)
    starts, lens = split.starts, split.lens
    decode_rows = sorted(split.decode, key=lambda i: lens[i])
    block_size = k_cache.shape[1]
    row_block_bytes = 2 * k_cache[0].numel() * k_cache.element_size()  # keys and values of one block
    chunks = []
    first = 0
    while first < len(decode_rows):
        last = first + 1  # rows first..last-1; sorted, so the last row is the longest
        while last < len(decode_rows):
            num_blocks = -(-lens[decode_rows[last]] // block_size)
            if (last + 1 - first) * num_blocks * row_block_bytes > DECODE_CHUNK_BYTES:
                break
            last += 1
        rows = decode_rows[first:last]
        chunks.append(
            _decode_chunk_plan(block_tables, [lens[i] for i in rows], rows, [starts[i] for i in rows], block_size)
        )
        first = last
    return StepPlan(chunks, split.prefills)


def _decode_chunk_plan(
    block_tables: torch.Tensor, lens: list[int], rows: list[int], token_starts: list[int], block_size: int
) -> _DecodeChunk:
    device = block_tables.device
    num_blocks = -(-max(lens) // block_size)
    rows_t = torch.tensor(rows, dtype=torch.long, device=device)
    row_lens = torch.tensor(lens, dtype=torch.long, device=device)  # [n]
    tables = block_tables[rows_t, :num_blocks].long()  # [n, num_blocks]
    # Entries past a row's own blocks may hold anything (-1 in some callers): read block 0 there, masked.
    unused = torch.arange(num_blocks, device=device)[None, :] * block_size >= row_lens[:, None]  # [n, nb]
    gather_idx = tables.masked_fill(unused, 0).reshape(-1)  # [n * num_blocks]
    mask = torch.arange(num_blocks * block_size, device=device)[None, :] < row_lens[:, None]  # [n, S]
    token_idx = torch.tensor(token_starts, dtype=torch.long, device=device)
    return _DecodeChunk(token_idx, gather_idx, mask[:, None, None, :], num_blocks)


_scratch = threading.local()  # per thread: {(dtype, device): flat buffer}


def _scratch_buffer(numel: int, like: torch.Tensor) -> torch.Tensor:
    """A reused flat buffer of at least `numel` elements. Fresh multi-MiB tensors every layer made glibc map
    and unmap pages each time (page faults were half the decode attention's time at long contexts). One made
    under inference mode cannot be written outside it, so each mode keeps its own."""
    buffers = _scratch.__dict__.setdefault("buffers", {})
    key = (like.dtype, like.device, torch.is_inference_mode_enabled())
    buffer = buffers.get(key)
    if buffer is None or buffer.numel() < numel:
        buffer = torch.empty(numel, dtype=like.dtype, device=like.device)
        buffers[key] = buffer
    return buffer[:numel]


def _decode_chunk(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    chunk: _DecodeChunk,
    scale: float,
    out: torch.Tensor,
) -> None:
    """Padded SDPA over one chunk's single-token queries: gather whole blocks, mask past each length."""
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_blocks, block_size, num_kv_heads = k_cache.shape[0], k_cache.shape[1], k_cache.shape[2]
    n, nb = chunk.mask.shape[0], chunk.num_blocks
    span = nb * block_size
    group = num_heads // num_kv_heads
    # index_select on [num_blocks, block_numel] rows is one memcpy per block; advanced indexing on the 4-d
    # cache is several times slower.
    k_rows, v_rows = k_cache.reshape(num_blocks, -1), v_cache.reshape(num_blocks, -1)  # [num_blocks, bs*H_kv*D]
    block_numel = k_rows.shape[1]
    scratch = _scratch_buffer(2 * n * nb * block_numel, k_cache)
    keys = torch.index_select(k_rows, 0, chunk.gather_idx, out=scratch[: n * nb * block_numel].view(n * nb, -1))
    values = torch.index_select(v_rows, 0, chunk.gather_idx, out=scratch[n * nb * block_numel :].view(n * nb, -1))
    keys = keys.view(n, span, num_kv_heads, head_dim).transpose(1, 2)  # [n, H_kv, S, D]
    values = values.view(n, span, num_kv_heads, head_dim).transpose(1, 2)
    q = query.index_select(0, chunk.token_idx)  # [n, H, D]
    # A kv head's query heads as G query rows of one attention: its keys are read once, not G times.
    o = F.scaled_dot_product_attention(
        q.reshape(n, num_kv_heads, group, head_dim),  # [n, H_kv, G, D]
        keys if keys.dtype == q.dtype else keys.to(q.dtype),
        values if values.dtype == q.dtype else values.to(q.dtype),
        attn_mask=chunk.mask,  # [n, 1, 1, S]
        scale=scale,
    )  # [n, H_kv, G, D]
    out.index_copy_(0, chunk.token_idx, o.reshape(n, num_heads, head_dim))


def prefill_one(
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
    if context_len == 0:  # a whole prompt: plain causal attention, no mask to build or read
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)  # [1, H, q_len, D]
    else:
        q_pos = torch.arange(context_len, seq_len, device=query.device)[:, None]  # [q_len, 1]
        k_pos = torch.arange(seq_len, device=query.device)[None, :]  # [1, S]
        mask = k_pos <= q_pos  # [q_len, S]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)  # [1, H, q_len, D]
    out[start : start + q_len] = o[0].transpose(0, 1)
