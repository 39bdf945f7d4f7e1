"""The CPU attention backend: decode rows and prompts (or prompt chunks) through the C++ kernels (`cpu_native`),
which read the paged cache in place; the layers' residual add + RMSNorm, SiLU-and-mul and rotary as single C++
passes (`cpu_fused`). Prompts stay on the torch reference's causal SDPA where the prefill kernel was built without
its AVX-512 tiles (slower than SDPA there).

Chosen by default on CPU when the kernel builds (`select_backend`); the torch reference stays the fallback and
the oracle the tests compare it with.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model_handler.kernels import cpu_fused, cpu_native, reference
from model_handler.layers.attention_metadata import AttentionMetadata


@dataclass(slots=True)
class CpuStepPlan:
    """One step's rows, split once and shared by every layer."""

    query_rows: torch.Tensor  # [n] int64: the query token of each decode row (one new token)
    seq_rows: torch.Tensor  # [n] int64: its sequence
    prefills: list[tuple[int, int, int, int]]  # (query start, q_len, seq_len, row) of each longer query
    prefill_rows: torch.Tensor  # the same as a [P, 4] int64 tensor, for the C++ prefill kernel

    @classmethod
    def build(cls, seq_lens: torch.Tensor, query_start_loc: torch.Tensor) -> CpuStepPlan:
        split = reference.RowSplit.of(seq_lens, query_start_loc)
        return cls(
            torch.tensor([split.starts[i] for i in split.decode], dtype=torch.long),
            torch.tensor(split.decode, dtype=torch.long),
            split.prefills,
            torch.tensor(split.prefills, dtype=torch.long).reshape(-1, 4),
        )


class CpuBackend:
    """Torch reference for the KV store, the C++ kernels for attention and the elementwise ops."""

    name = "cpu"
    fused = cpu_fused

    def __init__(self) -> None:
        if not cpu_native.load():
            raise RuntimeError("the C++ CPU kernels could not be built or loaded (the log says why)")
        self.prefill_kernel = cpu_native.paged_prefill_attention_is_vectorized()

    def store_kv(self, key, value, k_cache, v_cache, slot_mapping) -> None:
        reference.store_kv(key, value, k_cache, v_cache, slot_mapping)

    def attention(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        v_cache: torch.Tensor,
        metadata: AttentionMetadata,
        scale: float,
        out: torch.Tensor | None = None,
        *,
        sliding_window: int | None = None,
        softcap: float | None = None,
    ) -> torch.Tensor:
        if out is None:
            out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
        if (
            query.dtype != k_cache.dtype
            or query.stride(-1) != 1
            or query.stride(-2) != query.shape[-1]
            or not (k_cache.is_contiguous() and v_cache.is_contiguous() and out.is_contiguous())
        ):  # layouts the kernel does not take (a cache in another dtype, a strided cache): the reference does all
            return reference.paged_attention(
                query,
                k_cache,
                v_cache,
                metadata.block_tables,
                metadata.seq_lens,
                metadata.query_start_loc,
                scale,
                out,
                sliding_window=sliding_window,
                softcap=softcap,
            )
        plan = metadata.backend_plan
        if plan is None:  # first layer of the step
            plan = metadata.backend_plan = CpuStepPlan.build(metadata.seq_lens, metadata.query_start_loc)
        if plan.query_rows.numel():
            cpu_native.paged_decode_attention(
                out,
                query,
                k_cache,
                v_cache,
                metadata.block_tables,
                metadata.seq_lens,
                plan.query_rows,
                plan.seq_rows,
                scale,
                sliding_window,
                softcap,
            )
        if plan.prefills and self.prefill_kernel:
            cpu_native.paged_prefill_attention(
                out, query, k_cache, v_cache, metadata.block_tables, plan.prefill_rows, scale, sliding_window, softcap
            )
        elif plan.prefills:
            for start, q_len, seq_len, row in plan.prefills:
                table = metadata.block_tables[row]
                reference.prefill_one(
                    query, k_cache, v_cache, table, seq_len, start, q_len, scale, out, sliding_window, softcap
                )
        return out
