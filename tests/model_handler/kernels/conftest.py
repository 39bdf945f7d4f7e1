"""Kernel-test setup: Triton's interpreter on machines without CUDA, and a factory for paged batches."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    # Must happen before the first `import triton`: the flag is read when kernels are decorated.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from dataclasses import dataclass  # noqa: E402

import pytest  # noqa: E402

from model_handler.layers.attention_metadata import AttentionMetadata  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass(slots=True)
class PagedBatch:
    query: torch.Tensor  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32
    seq_lens: torch.Tensor  # [num_seqs] int32
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    slot_mapping: torch.Tensor  # [num_tokens] int64, the new tokens' slots
    used_slots: torch.Tensor  # [num_blocks * block_size] bool, slots inside some sequence's context

    @property
    def max_query_len(self) -> int:
        return int((self.query_start_loc[1:] - self.query_start_loc[:-1]).max())

    def metadata(self) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping,
            query_start_loc=self.query_start_loc,
            seq_lens=self.seq_lens,
            block_tables=self.block_tables,
            max_query_len=self.max_query_len,
            max_seq_len=int(self.seq_lens.max()),
        )


def make_paged_batch(
    q_lens: list[int],
    seq_lens: list[int],
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 32,
    block_size: int = 16,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> PagedBatch:
    """Random query and cache; each sequence owns shuffled blocks, so block tables are not the identity."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [(s + block_size - 1) // block_size for s in seq_lens]
    num_blocks = sum(blocks_per_seq) + 2  # spare blocks nobody owns
    order = torch.randperm(num_blocks, generator=gen)
    max_blocks = max(blocks_per_seq + [1]) + 1  # one unused trailing entry per row
    block_tables = torch.zeros(len(seq_lens), max_blocks, dtype=torch.int32)
    used = torch.zeros(num_blocks * block_size, dtype=torch.bool)
    slots = []
    taken = 0
    for i, (q_len, seq_len) in enumerate(zip(q_lens, seq_lens)):
        owned = order[taken : taken + blocks_per_seq[i]]
        taken += blocks_per_seq[i]
        block_tables[i, : len(owned)] = owned.int()
        pos = torch.arange(seq_len)
        seq_slots = owned[pos // block_size] * block_size + pos % block_size  # [seq_len]
        used[seq_slots] = True
        slots.append(seq_slots[seq_len - q_len :])
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    query_start_loc = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
    query_start_loc[1:] = torch.tensor(q_lens).cumsum(0)
    query = torch.randn(int(query_start_loc[-1]), num_heads, head_dim, generator=gen).to(dtype)
    return PagedBatch(
        query=query.to(DEVICE),
        k_cache=k_cache.to(DEVICE),
        v_cache=v_cache.to(DEVICE),
        block_tables=block_tables.to(DEVICE),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        query_start_loc=query_start_loc.to(DEVICE),
        slot_mapping=torch.cat(slots).long().to(DEVICE) if slots else torch.zeros(0, dtype=torch.long),
        used_slots=used.to(DEVICE),
    )


def poison_unused(cache: torch.Tensor, used_slots: torch.Tensor) -> torch.Tensor:
    """A copy of `cache` with NaN in every slot outside all contexts: reading one would show in the output."""
    poisoned = cache.clone()
    flat = poisoned.view(-1, cache.shape[2], cache.shape[3])  # [num_slots, num_kv_heads, head_dim]
    flat[~used_slots] = float("nan")
    return poisoned


@pytest.fixture
def paged_batch():
    return make_paged_batch


@pytest.fixture
def poison():
    return poison_unused
