"""The CPU backend's fused elementwise kernels (`FusedKernels`), from the C++ extension (`csrc/cpu_elementwise.cpp`).

Each replaces several torch ops with one pass over memory, with torch's roundings (see the C++ file): these small
ops took a noticeable share of a CPU prefill step, each op reading and writing the whole activation again.
"""

from __future__ import annotations

import torch


def add_rms_norm(
    x: torch.Tensor,  # [T, hidden]
    residual: torch.Tensor | None,  # [T, hidden] or None (the first layer)
    weight: torch.Tensor,  # [hidden]
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual) * weight, x + residual); with residual None, (rms_norm(x) * weight, x)."""
    return torch.ops.sagemaker_llm_cpu.add_rms_norm(x, residual, weight.to(x.dtype), eps)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for x = [gate | up] along the last dim: [T, 2d] -> [T, d]."""
    return torch.ops.sagemaker_llm_cpu.silu_and_mul(x)


def rotary_(
    x: torch.Tensor,  # [T, num_heads, head_dim], unit stride along head_dim
    cos_sin_cache: torch.Tensor,  # [max_position, 2, rotary_dim]: cos, sign-folded sin (RotaryEmbedding)
    positions: torch.Tensor,  # [T] int64
) -> torch.Tensor:
    """Rotate the first rotary_dim dims of every head in place (HF's rotate_half convention); returns x."""
    return torch.ops.sagemaker_llm_cpu.rotary_(x, cos_sin_cache.to(x.dtype), positions)
