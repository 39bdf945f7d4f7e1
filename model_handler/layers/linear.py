"""Tensor-parallel linear layers and the weight loaders that cut each rank's shard out of an HF tensor.

Every parameter carries `weight_loader(param, loaded_weight, shard_id=None)`; `weights.py` calls it with
the full checkpoint tensor and the loader copies (and converts) this rank's slice; it writes through
`param.detach()`, not `.data`, so the parameter's version moves and a packed CPU copy (cpu_linear) follows.
With tp_size == 1 the layers are plain linears and never touch torch.distributed.
"""

from __future__ import annotations

import torch
from torch import nn

from model_handler.distributed import all_reduce
from model_handler.layers.cpu_linear import PackedWeight
from model_handler.layers.matmul import linear


def divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator != 0:
        raise ValueError(f"{what} ({numerator}) is not divisible by the tensor-parallel size ({denominator})")
    return numerator // denominator


def copy_checked(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Copy with dtype conversion; a shape mismatch is a checkpoint/config disagreement, so say so."""
    if dst.shape != src.shape:
        raise ValueError(f"checkpoint tensor has shape {tuple(src.shape)}, expected {tuple(dst.shape)}")
    dst.copy_(src)


def default_weight_loader(param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: object = None) -> None:
    copy_checked(param.detach(), loaded_weight)


class LinearBase(nn.Module):
    """Owns `weight` [out_per_rank, in_per_rank] and an optional `bias`, both with this class's loader."""

    def __init__(self, input_size: int, output_size: int, bias: bool, tp_rank: int, tp_size: int) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.weight = nn.Parameter(torch.empty(output_size, input_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)
        self.packed_weight = PackedWeight()  # oneDNN's copy of the weight, made on the first CPU forward

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: object = None) -> None:
        copy_checked(param.detach(), loaded_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.packed_weight)


class ReplicatedLinear(LinearBase):
    """The same full weight on every rank."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False) -> None:
        super().__init__(input_size, output_size, bias, 0, 1)


class ColumnParallelLinear(LinearBase):
    """Output features split across ranks; each rank's output is its slice (no communication)."""

    def __init__(
        self, input_size: int, output_size: int, bias: bool = False, *, tp_rank: int = 0, tp_size: int = 1
    ) -> None:
        super().__init__(input_size, divide(output_size, tp_size, "output size"), bias, tp_rank, tp_size)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: object = None) -> None:
        size = param.shape[0]
        copy_checked(param.detach(), loaded_weight.narrow(0, self.tp_rank * size, size))


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel linears sharing one input, fused into one matmul (gate + up). The checkpoint holds
    them apart (shard ids 0, 1, ...) or already fused (shard id None: Phi-3's `gate_up_proj`)."""

    def __init__(
        self, input_size: int, output_sizes: list[int], bias: bool = False, *, tp_rank: int = 0, tp_size: int = 1
    ) -> None:
        self.output_sizes = [divide(size, tp_size, "output size") for size in output_sizes]
        super().__init__(input_size, sum(output_sizes), bias, tp_rank=tp_rank, tp_size=tp_size)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: object = None) -> None:
        if shard_id is None:  # the fused tensor: each part cut into this rank's slice, as if it came apart
            full_sizes = [size * self.tp_size for size in self.output_sizes]
            if loaded_weight.shape[0] != sum(full_sizes):
                raise ValueError(f"checkpoint tensor has {loaded_weight.shape[0]} rows, expected {sum(full_sizes)}")
            for index, part in enumerate(loaded_weight.split(full_sizes)):
                self.weight_loader(param, part, index)
            return
        if not isinstance(shard_id, int) or not 0 <= shard_id < len(self.output_sizes):
            raise ValueError(f"merged linear expects a shard index below {len(self.output_sizes)}, got {shard_id!r}")
        size = self.output_sizes[shard_id]
        offset = sum(self.output_sizes[:shard_id])
        copy_checked(param.detach().narrow(0, offset, size), loaded_weight.narrow(0, self.tp_rank * size, size))


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections fused; heads split across ranks, kv heads replicated when fewer than ranks. The
    checkpoint holds them apart (shard ids "q", "k", "v") or already fused (shard id None: Phi-3's `qkv_proj`)."""

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        bias: bool = False,
        *,
        tp_rank: int = 0,
        tp_size: int = 1,
    ) -> None:
        self.head_dim = head_dim
        self.total_num_heads, self.total_num_kv_heads = num_heads, num_kv_heads
        self.num_heads = divide(num_heads, tp_size, "number of attention heads")
        if num_kv_heads >= tp_size:
            self.num_kv_heads = divide(num_kv_heads, tp_size, "number of key/value heads")
            self.num_kv_replicas = 1
        else:
            self.num_kv_heads = 1
            self.num_kv_replicas = divide(tp_size, num_kv_heads, "tensor-parallel size over key/value heads")
        self.q_size = self.num_heads * head_dim
        self.kv_size = self.num_kv_heads * head_dim
        output_size = (self.num_heads + 2 * self.num_kv_heads) * head_dim * tp_size
        super().__init__(hidden_size, output_size, bias, tp_rank=tp_rank, tp_size=tp_size)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: object = None) -> None:
        if shard_id is None:  # the fused tensor [q | k | v] of every head
            full_sizes = [self.total_num_heads * self.head_dim] + [self.total_num_kv_heads * self.head_dim] * 2
            if loaded_weight.shape[0] != sum(full_sizes):
                raise ValueError(f"checkpoint tensor has {loaded_weight.shape[0]} rows, expected {sum(full_sizes)}")
            for name, part in zip(("q", "k", "v"), loaded_weight.split(full_sizes)):
                self.weight_loader(param, part, name)
            return
        if shard_id == "q":
            offset, size, start = 0, self.q_size, self.tp_rank * self.q_size
        elif shard_id in ("k", "v"):
            offset = self.q_size if shard_id == "k" else self.q_size + self.kv_size
            size, start = self.kv_size, (self.tp_rank // self.num_kv_replicas) * self.kv_size
        else:
            raise ValueError(f"qkv linear expects shard 'q', 'k' or 'v', got {shard_id!r}")
        copy_checked(param.detach().narrow(0, offset, size), loaded_weight.narrow(0, start, size))


class RowParallelLinear(LinearBase):
    """Input features split across ranks; partial outputs are summed with one all-reduce.

    With `reduce_results=False` each rank returns its partial sum (the bias on rank 0 only), for a caller that
    adds several of them before one all-reduce of its own (a MoE block's shared expert and routed experts).
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = False,
        *,
        tp_rank: int = 0,
        tp_size: int = 1,
        reduce_results: bool = True,
    ) -> None:
        super().__init__(divide(input_size, tp_size, "input size"), output_size, bias, tp_rank, tp_size)
        self.reduce_results = reduce_results

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: object = None) -> None:
        if param.dim() == 2:
            size = param.shape[1]
            loaded_weight = loaded_weight.narrow(1, self.tp_rank * size, size)
        copy_checked(param.detach(), loaded_weight)  # the bias is whole: it is added once, after the reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return linear(x, self.weight, self.bias, self.packed_weight)
        if not self.reduce_results:
            return linear(x, self.weight, self.bias if self.tp_rank == 0 else None, self.packed_weight)
        y = all_reduce(linear(x, self.weight, None, self.packed_weight))
        return y if self.bias is None else y + self.bias
