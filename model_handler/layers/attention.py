"""The paged-attention step of one layer: store this step's k/v in the cache, attend over it.

The backend (torch reference or Triton) is handed in at construction; the per-step batch description
arrives as an argument, so there is no global attention context.
"""

from __future__ import annotations

import torch
from torch import nn

from model_handler.kernels import AttentionBackend
from model_handler.layers.attention_metadata import AttentionMetadata


class PagedAttention(nn.Module):
    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
        backend: AttentionBackend,
        sliding_window: int | None = None,
        softcap: float | None = None,
    ) -> None:
        """`sliding_window`: this layer attends to the last that many positions only; `softcap`: its logits are
        capped with cap * tanh(logit / cap) (Gemma 2)."""
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        self.backend = backend
        self.sliding_window = sliding_window
        self.softcap = softcap

    def forward(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        kv_cache: tuple[torch.Tensor, torch.Tensor],  # each [num_blocks, block_size, num_kv_heads, head_dim]
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:
        k_cache, v_cache = kv_cache
        self.backend.store_kv(key, value, k_cache, v_cache, attn_metadata.slot_mapping)
        out = torch.empty(
            query.shape[0], self.num_heads, self.head_dim, dtype=query.dtype, device=query.device
        )  # [num_tokens, num_heads, head_dim]
        self.backend.attention(
            query,
            k_cache,
            v_cache,
            attn_metadata,
            self.scale,
            out,
            sliding_window=self.sliding_window,
            softcap=self.softcap,
        )
        return out.view(query.shape[0], self.num_heads * self.head_dim)  # [num_tokens, num_heads * head_dim]
