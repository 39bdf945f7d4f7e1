"""The sparse mixture-of-experts MLP of Mixtral and Qwen MoE: a router, every expert's SwiGLU weights stacked
per layer and sharded over tensor-parallel ranks like the dense MLP (gate/up by columns, down by rows), an
optional gated shared expert, and one all-reduce for the whole block.

The experts run through the fused Triton kernel (`kernels/triton_moe.py`, CUDA-graph safe) with the Triton
attention backend, and through the torch loop over the experts that received tokens
(`kernels/moe_reference.py`) otherwise.
"""

from __future__ import annotations

import torch
from torch import nn

from model_handler.distributed import all_reduce
from model_handler.kernels import moe_reference
from model_handler.layers.linear import ReplicatedLinear, copy_checked, divide

# The checkpoint's per-expert projections, by their role: gate ("w1"), up ("w3") and down ("w2").
EXPERT_SHARDS = ("w1", "w3", "w2")


def expert_checkpoint_names(gate: str, up: str, down: str) -> dict[str, tuple[str, str]]:
    """`expert_modules_mapping` for weights.py: a checkpoint's `experts.N.<name>.weight` -> (our stacked
    parameter, the role), e.g. Mixtral's w1/w3/w2 or Qwen's gate_proj/up_proj/down_proj."""
    return {gate: ("w13_weight", "w1"), up: ("w13_weight", "w3"), down: ("w2_weight", "w2")}


class FusedMoE(nn.Module):
    """The experts of one layer: `w13_weight` [E, 2 * I/tp, hidden] (each expert's gate rows, then its up
    rows) and `w2_weight` [E, hidden, I/tp]. Returns this rank's partial sum; the caller all-reduces."""

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        *,
        use_triton: bool,
        tp_rank: int = 0,
        tp_size: int = 1,
    ) -> None:
        super().__init__()
        self.num_experts, self.hidden_size = num_experts, hidden_size
        self.intermediate_size = intermediate_size  # whole, as in the checkpoint
        self.intermediate_per_rank = divide(intermediate_size, tp_size, "expert intermediate size")
        self.tp_rank = tp_rank
        self.use_triton = use_triton
        inter = self.intermediate_per_rank
        self.w13_weight = nn.Parameter(torch.empty(num_experts, 2 * inter, hidden_size), requires_grad=False)
        self.w2_weight = nn.Parameter(torch.empty(num_experts, hidden_size, inter), requires_grad=False)
        for param, roles in ((self.w13_weight, ("w1", "w3")), (self.w2_weight, ("w2",))):
            param.weight_loader = self.weight_loader
            param.expected_shards = [(expert, role) for expert in range(num_experts) for role in roles]

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: object = None) -> None:
        """Copy this rank's slice of expert `shard_id[0]`'s checkpoint tensor for role `shard_id[1]`."""
        if (
            not isinstance(shard_id, tuple)
            or len(shard_id) != 2
            or not isinstance(shard_id[0], int)
            or not 0 <= shard_id[0] < self.num_experts
            or shard_id[1] not in EXPERT_SHARDS
        ):
            raise ValueError(
                f"expert weights take (expert below {self.num_experts}, one of {EXPERT_SHARDS}), got {shard_id!r}"
            )
        expert, role = shard_id
        inter, start = self.intermediate_per_rank, self.tp_rank * self.intermediate_per_rank
        if role == "w2":
            expected = (self.hidden_size, self.intermediate_size)
        else:
            expected = (self.intermediate_size, self.hidden_size)
        if tuple(loaded_weight.shape) != expected:
            raise ValueError(f"checkpoint tensor has shape {tuple(loaded_weight.shape)}, expected {expected}")
        if role == "w2":
            copy_checked(param.detach()[expert], loaded_weight.narrow(1, start, inter))
        else:
            offset = 0 if role == "w1" else inter
            copy_checked(param.detach()[expert].narrow(0, offset, inter), loaded_weight.narrow(0, start, inter))

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """[T, hidden]: each token's experts weighted by its routing weights (this rank's share of I)."""
        if self.use_triton:
            from model_handler.kernels import triton_moe  # imports triton: only where the backend is Triton

            return triton_moe.fused_experts(x, self.w13_weight, self.w2_weight, topk_weights, topk_ids)
        return moe_reference.experts(x, self.w13_weight, self.w2_weight, topk_weights, topk_ids)


class SparseMoeBlock(nn.Module):
    """router -> softmax -> top-k (renormalised or not) -> weighted sum of the chosen experts, plus an optional
    shared expert scaled by sigmoid(shared_expert_gate(x)) (Qwen2-MoE); one all-reduce for both."""

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        intermediate_size: int,
        *,
        renormalize: bool,
        use_triton: bool,
        shared_expert: nn.Module | None = None,
        shared_expert_gate: bool = False,
        tp_rank: int = 0,
        tp_size: int = 1,
    ) -> None:
        super().__init__()
        if not 0 < top_k <= num_experts:
            raise ValueError(
                f"num_experts_per_tok ({top_k}) must be between 1 and the number of experts ({num_experts})"
            )
        if shared_expert_gate and shared_expert is None:
            raise ValueError("a shared expert gate needs a shared expert")
        self.top_k, self.renormalize, self.tp_size = top_k, renormalize, tp_size
        self.gate = ReplicatedLinear(hidden_size, num_experts)  # router logits [T, E], on every rank
        self.experts = FusedMoE(
            num_experts, hidden_size, intermediate_size, use_triton=use_triton, tp_rank=tp_rank, tp_size=tp_size
        )
        self.shared_expert = shared_expert  # must return its partial sum, unreduced
        self.shared_expert_gate = ReplicatedLinear(hidden_size, 1) if shared_expert_gate else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        router_logits = self.gate(x)  # [T, E]
        topk_weights, topk_ids = moe_reference.route(router_logits, self.top_k, self.renormalize)  # [T, k] each
        out = self.experts(x, topk_weights, topk_ids)  # [T, hidden]
        if self.shared_expert is not None:
            shared = self.shared_expert(x)  # [T, hidden]
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared  # [T, 1] * [T, hidden]
            out = out + shared
        # Every term above is linear in the rank's slice of I: the sum of the ranks' sums is the whole.
        return all_reduce(out) if self.tp_size > 1 else out


def num_experts_of(hf_config: object) -> int:
    """The number of routed experts: Mixtral's `num_local_experts`, Qwen MoE's `num_experts`."""
    value = getattr(hf_config, "num_local_experts", None)
    if value is None:
        value = getattr(hf_config, "num_experts", None)
    if value is None:
        raise ValueError("the MoE config names no number of experts (num_local_experts or num_experts)")
    return int(value)


def check_moe_activation(hf_config: object) -> None:
    """Our experts are SwiGLU: refuse a config whose `hidden_act` is anything but SiLU, rather than ignore it."""
    act = getattr(hf_config, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"MoE experts with hidden_act {act!r} are not supported (only silu)")
