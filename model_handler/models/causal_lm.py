"""What the engine relies on from every registered model class."""

from __future__ import annotations

from typing import Protocol

import torch

from model_handler.layers.attention_metadata import AttentionMetadata
from model_handler.model_config import ModelConfig


class CausalLM(Protocol):
    """What the engine relies on from every registered model class."""

    config: ModelConfig
    num_kv_heads_per_rank: int

    def forward(
        self,
        input_ids: torch.Tensor,  # [T] int64
        positions: torch.Tensor,  # [T] int64
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        attn_metadata: AttentionMetadata,
        output_rows: torch.Tensor | None = None,  # [N] int64: return only these rows' hidden states
    ) -> torch.Tensor: ...  # [T, hidden], or [N, hidden] with output_rows

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor: ...  # [N, vocab] float32
