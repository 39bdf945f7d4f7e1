"""The product every linear layer and the LM head run: the fastest kernel known for the device and shape."""

from __future__ import annotations

import torch

from model_handler.layers import cpu_linear, gpu_linear
from model_handler.layers.cpu_linear import PackedWeight


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, packed: PackedWeight) -> torch.Tensor:
    """F.linear(x, weight, bias): on CUDA cuBLAS or the one-row Triton GEMV, on CPU F.linear or packed oneDNN."""
    if x.is_cuda:
        return gpu_linear.linear(x, weight, bias)
    return cpu_linear.linear(x, weight, bias, packed)
