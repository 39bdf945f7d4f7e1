"""Mixture-of-experts in plain torch: top-k routing (every device) and the experts' SwiGLU MLPs (the CPU path
and the oracle `triton_moe` is tested against).

The experts loop runs over the experts that received tokens, each on all of its tokens at once (index_select,
two matmuls, index_add): a Python step per expert, never per token. It reads the per-expert counts on the
host, so on CUDA it syncs the device and cannot be graph-captured; the GPU path is `triton_moe`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, top_k] fp32, expert ids [T, top_k] int64): softmax over the experts in fp32, the top_k
    largest, renormalised to sum to one when `renormalize` (Mixtral always; Qwen MoE with norm_topk_prob)."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)  # [T, E]
    weights, ids = torch.topk(probs, top_k, dim=-1)  # [T, top_k] each
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def experts(
    x: torch.Tensor,  # [T, hidden]
    w13: torch.Tensor,  # [E, 2 * I, hidden]: gate rows then up rows
    w2: torch.Tensor,  # [E, hidden, I]
    topk_weights: torch.Tensor,  # [T, top_k]
    topk_ids: torch.Tensor,  # [T, top_k]
) -> torch.Tensor:
    """sum_j topk_weights[t, j] * down_e(silu(gate_e(x_t)) * up_e(x_t)) with e = topk_ids[t, j]: [T, hidden].

    Accumulates in fp32 and rounds once at the end."""
    num_tokens, hidden = x.shape
    num_experts, two_i, _ = w13.shape
    top_k = topk_ids.shape[1]
    inter = two_i // 2
    flat_ids = topk_ids.reshape(-1)  # [P] pair p = token p // top_k, its (p % top_k)-th choice
    order = torch.argsort(flat_ids, stable=True)  # [P] pairs grouped by expert
    tokens = order // top_k  # [P]
    weights = topk_weights.reshape(-1)[order].to(torch.float32)  # [P]
    counts = torch.bincount(flat_ids, minlength=num_experts).tolist()  # host: the loop's bounds
    out = torch.zeros(num_tokens, hidden, dtype=torch.float32, device=x.device)  # [T, hidden]
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        rows = tokens[start : start + count]  # [n] the expert's tokens
        gate_up = F.linear(x.index_select(0, rows), w13[expert])  # [n, 2I]
        activated = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]  # [n, I]
        down = F.linear(activated, w2[expert])  # [n, hidden]
        out.index_add_(0, rows, down.to(torch.float32) * weights[start : start + count, None])
        start += count
    return out.to(x.dtype)
