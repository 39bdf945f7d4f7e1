"""Per-step description of the flat batch that every attention layer reads.

Built once per step by the model runner and passed down the model; the layout is documented in
`model_handler/kernels/reference.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] int64, where each new token's k/v goes; < 0 = padding, skipped
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    seq_lens: torch.Tensor  # [num_seqs] int32, context length after this step
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32
    max_query_len: int
    max_seq_len: int
    rope_lengths: torch.Tensor | None = None
    """[num_tokens] int64, for a length-dependent rope only (longrope, dynamic): the sequence length each token's
    rotation is chosen for, max(position + 1, prompt length); None means position + 1 (every decode step)."""
    backend_plan: Any = None
    """Filled by the attention backend at the first layer of a step and reused by the others (the torch
    backend's row split and gather indices); one metadata object lives for exactly one step."""

    @property
    def num_seqs(self) -> int:
        return int(self.seq_lens.shape[0])
