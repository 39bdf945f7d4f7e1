"""Gated activations over the fused gate/up projection output: SiLU (Llama, Phi-3) and any other transformers
names (Gemma's GeGLU, `gelu_pytorch_tanh`)."""

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


class GatedActivation(nn.Module):
    """act(gate) * up for x = [gate | up] along the last dim, `act` looked up by transformers' name (`ACT2FN`), so
    it is the very function the checkpoint was trained with: [..., 2 * d] -> [..., d]."""

    def __init__(self, name: str) -> None:
        super().__init__()
        from transformers.activations import ACT2FN

        if name not in ACT2FN:
            raise ValueError(f"unsupported activation {name!r} in config.json")
        self.act = ACT2FN[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1] // 2
        return self.act(x[..., :d]) * x[..., d:]
