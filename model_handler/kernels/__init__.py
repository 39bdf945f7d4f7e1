"""Attention backends over the paged KV cache; one is chosen once at start-up for the device.

Every backend has the same two entry points with the layout documented in `reference.py`:
`store_kv(key, value, k_cache, v_cache, slot_mapping)` and
`attention(query, k_cache, v_cache, metadata, scale, out, sliding_window=, softcap=) -> out` (a layer's window in
tokens and its attention-logit soft-cap; None for neither),
and says in `fused` which fused elementwise kernels the layers use with it (None: plain torch ops).
"""

from __future__ import annotations

from typing import Protocol

import torch

from model_handler.kernels import reference
from model_handler.layers.attention_metadata import AttentionMetadata


class FusedKernels(Protocol):
    """Single-launch versions of a layer's elementwise ops (`triton_fused` implements them)."""

    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor: ...

    def rotary_(self, x: torch.Tensor, cos_sin_cache: torch.Tensor, positions: torch.Tensor) -> torch.Tensor: ...


class AttentionBackend(Protocol):
    name: str
    fused: FusedKernels | None

    def store_kv(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None: ...

    def attention(
        self,
        query: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        metadata: AttentionMetadata,
        scale: float,
        out: torch.Tensor | None = None,
        *,
        sliding_window: int | None = None,
        softcap: float | None = None,
    ) -> torch.Tensor: ...


class TorchReferenceBackend:
    """Plain torch (SDPA over gathered blocks): the CPU path."""

    name = "torch"
    fused = None

    def store_kv(self, key, value, k_cache, v_cache, slot_mapping) -> None:
        reference.store_kv(key, value, k_cache, v_cache, slot_mapping)

    def attention(
        self, query, k_cache, v_cache, metadata, scale, out=None, *, sliding_window=None, softcap=None
    ) -> torch.Tensor:
        if metadata.backend_plan is None:  # first layer of the step
            metadata.backend_plan = {}
        plan = metadata.backend_plan.get(sliding_window)  # one per window: a window changes the blocks read
        if plan is None:
            plan = metadata.backend_plan[sliding_window] = reference.build_plan(
                metadata.block_tables, metadata.seq_lens, metadata.query_start_loc, k_cache, sliding_window
            )
        return reference.paged_attention(
            query,
            k_cache,
            v_cache,
            metadata.block_tables,
            metadata.seq_lens,
            metadata.query_start_loc,
            scale,
            out=out,
            plan=plan,
            sliding_window=sliding_window,
            softcap=softcap,
        )


def select_backend(device: torch.device, name: str | None = None) -> AttentionBackend:
    """`name` forces a backend ("torch", "cpu" or "triton"); by default Triton on CUDA, and on CPU the C++
    kernels where they build (`cpu_native`), else plain torch."""
    if name is None:
        if device.type == "cuda":
            name = "triton"
        else:
            from model_handler.kernels import cpu_native

            name = "cpu" if cpu_native.load() else "torch"
    if name == "torch":
        return TorchReferenceBackend()
    if name == "cpu":
        if device.type != "cpu":
            raise ValueError(f"attention backend 'cpu' runs on the CPU only, not on {device.type}")
        from model_handler.kernels.cpu_backend import CpuBackend

        return CpuBackend()
    if name == "triton":
        from model_handler.kernels.triton_backend import TritonBackend  # imported only when chosen

        return TritonBackend()
    raise ValueError(f"unknown attention backend {name!r}; expected 'torch', 'cpu' or 'triton'")
