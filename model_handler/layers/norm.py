"""RMSNorm, optionally fused with the residual add that precedes it in every decoder layer."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from model_handler.kernels import FusedKernels


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6, fused: FusedKernels | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.normalized_shape = (hidden_size,)
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.fused = fused  # the attention backend's kernels: one launch for the add and the norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One fused op (normalisation in fp32 inside the kernel); identical to HF's formula in fp32.
        return F.rms_norm(x, self.normalized_shape, self.weight, self.eps)

    def forward_with_residual(
        self, x: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual), summed in x's dtype; the first layer passes residual=None."""
        if self.fused is not None:
            return self.fused.add_rms_norm(x, residual, self.weight, self.eps)
        if residual is not None:
            x = x + residual
        return self.forward(x), x
