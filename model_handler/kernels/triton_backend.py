"""The Triton attention backend: fused KV store plus paged decode/prefill kernels behind `AttentionBackend`."""

from __future__ import annotations

import torch

from model_handler.kernels import triton_attention, triton_fused, triton_kv_store
from model_handler.layers.attention_metadata import AttentionMetadata


class TritonBackend:
    """GPU path (and CPU under TRITON_INTERPRET=1). Neither call syncs the device, so both can be graph-captured."""

    name = "triton"
    fused = triton_fused

    def __init__(self, num_splits: int | None = None) -> None:
        # None: splits chosen per call from the batch size and the SM count (static shapes only).
        self.num_splits = num_splits

    def store_kv(
        self,
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,  # [num_tokens] int64, negative = skip
    ) -> None:
        triton_kv_store.store_kv(key, value, k_cache, v_cache, slot_mapping)

    def attention(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        metadata: AttentionMetadata,
        scale: float,
        out: torch.Tensor | None = None,
        *,
        sliding_window: int | None = None,
        softcap: float | None = None,
    ) -> torch.Tensor:
        return triton_attention.paged_attention(
            query,
            k_cache,
            v_cache,
            metadata.block_tables,
            metadata.seq_lens,
            metadata.query_start_loc,
            scale,
            metadata.max_query_len,
            out=out,
            num_splits=self.num_splits,
            sliding_window=sliding_window,
            softcap=softcap,
        )
