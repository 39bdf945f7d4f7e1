"""Gated activation over the fused gate/up projection output."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from model_handler.kernels import FusedKernels


class SiluAndMul(nn.Module):
    """silu(gate) * up for x = [gate | up] along the last dim: [..., 2 * d] -> [..., d]."""

    def __init__(self, fused: FusedKernels | None = None) -> None:
        super().__init__()
        self.fused = fused  # the attention backend's kernels: one launch instead of two

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused is not None and x.dim() == 2:
            return self.fused.silu_and_mul(x)
        d = x.shape[-1] // 2
        return F.silu(x[..., :d]) * x[..., d:]
