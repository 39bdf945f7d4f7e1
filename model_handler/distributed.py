"""Tensor-parallel collectives over torch.distributed's default group.

Layers hold their own `tp_rank`/`tp_size` and call these only when `tp_size > 1`, so a single-rank
model never touches torch.distributed (it need not even be initialised).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum `x` across ranks in place (the row-parallel and vocab-parallel reductions)."""
    dist.all_reduce(x)
    return x


def all_gather_last_dim(x: torch.Tensor, tp_size: int) -> torch.Tensor:
    """Concatenate every rank's `x` along the last dim: [..., n] -> [..., tp_size * n]."""
    x = x.contiguous()
    gathered = torch.empty((tp_size, *x.shape), dtype=x.dtype, device=x.device)  # [tp, ..., n]
    # all_gather_into_tensor needs NCCL on CUDA tensors; the list form works on every backend.
    if x.is_cuda:
        dist.all_gather_into_tensor(gathered, x)
    else:
        dist.all_gather(list(gathered.unbind(0)), x)
    return torch.cat(gathered.unbind(0), dim=-1)  # [..., tp * n]
