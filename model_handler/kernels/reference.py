"""Paged attention and KV-cache stores in plain torch: the CPU path and the oracle for the Triton kernels.

Layout shared by every backend:
  k_cache, v_cache   [num_blocks, block_size, num_kv_heads, head_dim]
  slot_mapping       [num_tokens] int64, slot = block_id * block_size + offset; a negative slot is skipped
  block_tables       [num_seqs, max_blocks_per_seq] int32, unused entries are ignored
  seq_lens           [num_seqs] int32, context length after this step (cached + new tokens)
  query_start_loc    [num_seqs + 1] int32, cumulative query lengths: the new tokens of sequence i are
                     query[query_start_loc[i]:query_start_loc[i + 1]]
The new tokens of a sequence are its last ones, so query token j of sequence i sits at position
seq_lens[i] - q_len_i + j and attends causally to keys 0..that position; with a sliding window W only to the last W
of them (keys p - W < k <= p, as transformers' sliding-window mask), and block-table entries wholly before every
query's window are never read (the block manager may have freed them). With a soft-cap c the scaled logits s become
c * tanh(s / c) before the softmax (Gemma 2).
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
    first_block: int = 0,
) -> torch.Tensor:
    """Cached tokens first_block * block_size .. seq_len - 1 of one sequence, contiguous:
    [seq_len - first_block * block_size, num_kv_heads, head_dim]."""
    block_size = cache.shape[1]
    num_blocks = (seq_len + block_size - 1) // block_size
    table = block_table[first_block:num_blocks].long()
    blocks = cache.reshape(cache.shape[0], -1).index_select(0, table)  # [nb, bs*H_kv*D]
    return blocks.view(-1, cache.shape[2], cache.shape[3])[: seq_len - first_block * block_size]


def first_key(query_pos: int, sliding_window: int | None) -> int:
    """The earliest key a query at `query_pos` attends to."""
    return 0 if sliding_window is None else max(0, query_pos - sliding_window + 1)


def attend(
    q: torch.Tensor,  # [..., H, M, D]
    k: torch.Tensor,  # [..., H_kv, S, D]
    v: torch.Tensor,  # [..., H_kv, S, D]
    mask: torch.Tensor | None,  # broadcastable to [..., H, M, S], True = attend; None = causal from the start
    scale: float,
    softcap: float | None,
) -> torch.Tensor:
    """SDPA, or where logits are soft-capped (SDPA cannot) the same in explicit steps, in fp32 whatever the inputs
    (as SDPA's CPU kernels accumulate): softmax of cap * tanh(q.k * scale / cap) over the unmasked keys."""
    if softcap is None:
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    group = q.shape[-3] // k.shape[-3]
    k, v = k.float().repeat_interleave(group, dim=-3), v.float().repeat_interleave(group, dim=-3)  # [..., H, S, D]
    scores = torch.matmul(q.float(), k.transpose(-1, -2)) * scale  # [..., H, M, S]
    scores = torch.tanh(scores / softcap) * softcap
    if mask is None:
        mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v).to(q.dtype)


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
    *,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Causal attention of the new tokens over each sequence's paged context (new tokens already stored).

    Decode rows (one query token) are done in padded SDPA calls over chunks of rows of similar length; longer
    queries one sequence at a time. Host syncs are fine here: this path runs on CPU or as a test oracle. `plan`
    (from `build_plan` on the same metadata, cache and window) saves every layer after the first from rebuilding it.
    """
    if out is None:
        out = torch.empty_like(query)
    if plan is None:
        plan = build_plan(block_tables, seq_lens, query_start_loc, k_cache, sliding_window)
    for chunk in plan.decode:
        _decode_chunk(query, k_cache, v_cache, chunk, scale, out, softcap)
    for start, q_len, seq_len, row in plan.prefills:
        prefill_one(
            query, k_cache, v_cache, block_tables[row], seq_len, start, q_len, scale, out, sliding_window, softcap
        )
    return out


@dataclass(slots=True)
class _DecodeChunk:
    """Decode rows attended in one SDPA call: which query tokens, which blocks to gather, the mask."""

    token_idx: torch.Tensor  # [n] int64, the rows' query tokens
    gather_idx: torch.Tensor  # [n * num_blocks] int64, block ids to copy, row by row (from each row's window start)
    mask: torch.Tensor  # [n, 1, 1, num_blocks * block_size] bool, True where a key is inside the context (window)
    num_blocks: int


@dataclass(slots=True)
class StepPlan:
    """How one step's rows split into decode chunks and prefills; built once per step, shared by all layers."""

    decode: list[_DecodeChunk]
    prefills: list[tuple[int, int, int, int]]  # (query start, q_len, seq_len, row) of longer queries


DECODE_CHUNK_BYTES = 4 << 20
"""Gathered keys + values per decode chunk: a few MiB stay in cache between the copy and the attention that
reads them (faster than the whole batch at once; bench/engine_step.py measures it)."""


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
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    k_cache: torch.Tensor,
    sliding_window: int | None = None,
) -> StepPlan:
    """The step's row split and decode chunks (a few host syncs, once per step and window).

    Decode rows are taken shortest first, so each chunk is padded to the longest row of similar ones rather than
    to the longest of the step (less padding gathered and attended, identical outputs). With a window a row spans
    the blocks from its window's start.
    """
    split = RowSplit.of(seq_lens, query_start_loc)
    starts, lens = split.starts, split.lens
    block_size = k_cache.shape[1]
    first_blocks = {i: first_key(lens[i] - 1, sliding_window) // block_size for i in split.decode}
    spans = {i: -(-lens[i] // block_size) - first_blocks[i] for i in split.decode}  # blocks each row reads
    decode_rows = sorted(split.decode, key=lambda i: spans[i])
    row_block_bytes = 2 * k_cache[0].numel() * k_cache.element_size()  # keys and values of one block
    chunks = []
    first = 0
    while first < len(decode_rows):
        last = first + 1  # rows first..last-1; sorted, so the last row spans the most blocks
        while last < len(decode_rows):
            if (last + 1 - first) * spans[decode_rows[last]] * row_block_bytes > DECODE_CHUNK_BYTES:
                break
            last += 1
        rows = decode_rows[first:last]
        chunks.append(
            _decode_chunk_plan(
                block_tables,
                rows,
                [lens[i] for i in rows],
                [first_blocks[i] for i in rows],
                [starts[i] for i in rows],
                block_size,
                sliding_window,
            )
        )
        first = last
    return StepPlan(chunks, split.prefills)


def _decode_chunk_plan(
    block_tables: torch.Tensor,
    rows: list[int],
    lens: list[int],
    first_blocks: list[int],
    token_starts: list[int],
    block_size: int,
    sliding_window: int | None,
) -> _DecodeChunk:
    device = block_tables.device
    rows_t = torch.tensor(rows, dtype=torch.long, device=device)
    row_lens = torch.tensor(lens, dtype=torch.long, device=device)  # [n]
    row_first = torch.tensor(first_blocks, dtype=torch.long, device=device)  # [n]
    num_blocks = int((-(-row_lens // block_size) - row_first).max())
    columns = row_first[:, None] + torch.arange(num_blocks, device=device)[None, :]  # [n, nb] block-table columns
    # Columns past a row's own blocks may hold anything (-1 in some callers): read block 0 there, masked.
    unused = columns * block_size >= row_lens[:, None]  # [n, nb]
    columns = columns.masked_fill(unused, 0)
    gather_idx = block_tables[rows_t[:, None], columns].long().masked_fill(unused, 0).reshape(-1)  # [n * nb]
    key_pos = row_first[:, None] * block_size + torch.arange(num_blocks * block_size, device=device)[None, :]
    mask = key_pos < row_lens[:, None]  # [n, S]
    if sliding_window is not None:
        mask &= key_pos > row_lens[:, None] - 1 - sliding_window
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
    softcap: float | None = None,
) -> None:
    """Padded SDPA over one chunk's single-token queries: gather whole blocks, mask outside each row's keys."""
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
    o = attend(
        q.reshape(n, num_kv_heads, group, head_dim),  # [n, H_kv, G, D]
        keys if keys.dtype == q.dtype else keys.to(q.dtype),
        values if values.dtype == q.dtype else values.to(q.dtype),
        chunk.mask,  # [n, 1, 1, S]
        scale,
        softcap,
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
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> None:
    """Causal SDPA of one sequence's q_len new tokens over its seq_len cached tokens (within the window)."""
    context_len = seq_len - q_len
    first_block = first_key(context_len, sliding_window) // k_cache.shape[1]
    base = first_block * k_cache.shape[1]  # position of the first gathered key
    q = query[start : start + q_len].transpose(0, 1).unsqueeze(0)  # [1, H, q_len, D]
    k = (
        gather_kv(k_cache, block_table, seq_len, first_block).transpose(0, 1).unsqueeze(0).to(q.dtype)
    )  # [1, H_kv, S, D]
    v = gather_kv(v_cache, block_table, seq_len, first_block).transpose(0, 1).unsqueeze(0).to(q.dtype)
    if context_len == 0 and sliding_window is None:  # a whole prompt: plain causal attention, no mask to build
        mask = None
    else:
        q_pos = torch.arange(context_len, seq_len, device=query.device)[:, None]  # [q_len, 1]
        k_pos = torch.arange(base, seq_len, device=query.device)[None, :]  # [1, S]
        mask = k_pos <= q_pos  # [q_len, S]
        if sliding_window is not None:
            mask &= k_pos > q_pos - sliding_window
    o = attend(q, k, v, mask, scale, softcap)  # [1, H, q_len, D]
    out[start : start + q_len] = o[0].transpose(0, 1)
