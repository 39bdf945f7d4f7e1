"""Fused mixture-of-experts on CUDA: (token, expert) pairs grouped by expert, then two grouped GEMMs.

`group_by_expert` lays the pairs out expert after expert, each expert's run padded to a multiple of BLOCK_M,
so every BLOCK_M-row block of the layout belongs to one expert. The grouped GEMM gives each block (times a
column tile) one program that multiplies its rows by that expert's weight: the gate/up launch computes
silu(x @ gate^T) * (x @ up^T) in one pass over the input, the down launch multiplies by the routing weight.
Each pair's row is then summed over its token's top-k experts. No launch reads a tensor on the host and every
grid follows from the shapes alone, so the whole path can be captured in a CUDA graph. Torch path (CPU and
test oracle): `moe_reference.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass(slots=True, frozen=True)
class MoeTileConfig:
    """Compile-time tile sizes of the grouped GEMMs; `tile_config` picks them, tests shrink them to reach edges."""

    block_m: int  # pair rows per program (one expert's)
    block_n: int  # output columns per program
    block_k: int  # reduction step
    num_warps: int
    num_stages: int
    dot_fp32: bool  # upcast tiles and multiply in fp32 ("ieee": no tf32)


def tile_config(num_pairs: int, num_experts: int, dtype: torch.dtype, on_gpu: bool) -> MoeTileConfig:
    """Tiles from static shapes only (CUDA-graph safe). Decode puts a handful of rows on each expert, so its
    blocks are short; a long prefill fills 64-row blocks. Not tuned per GPU yet."""
    # Under the interpreter bf16 tl.dot is wrong (see triton_attention), so CPU always multiplies in fp32.
    dot_fp32 = not on_gpu or dtype == torch.float32
    rows_per_expert = num_pairs / max(1, num_experts)
    block_m = 16 if rows_per_expert <= 16 else 32 if rows_per_expert <= 64 else 64
    if on_gpu and dtype == torch.float32:
        return MoeTileConfig(block_m=16, block_n=32, block_k=32, num_warps=4, num_stages=2, dot_fp32=True)
    if block_m == 16:
        return MoeTileConfig(block_m, block_n=64, block_k=128, num_warps=4, num_stages=3, dot_fp32=dot_fp32)
    return MoeTileConfig(block_m, block_n=64, block_k=64, num_warps=4, num_stages=3, dot_fp32=dot_fp32)


@dataclass(slots=True)
class ExpertLayout:
    """Pairs (row t * top_k + j of topk_ids) grouped by expert, each expert's run padded to BLOCK_M rows."""

    sorted_pair_ids: torch.Tensor  # [max_rows] int32: the pair in each row; num_pairs marks a padding row
    block_experts: torch.Tensor  # [max_rows // block_m] int32: the expert of each block
    padded_ends: torch.Tensor  # [num_experts] int32: where each expert's run ends; the last is the rows in use
    block_m: int


@triton.jit
def _place_pairs_kernel(
    expert_ids_ptr,  # [num_pairs] the chosen expert of every pair
    counts_ptr,  # [num_experts] pairs per expert
    padded_ends_ptr,  # [num_experts] inclusive cumsum of the counts rounded up to BLOCK_M
    sorted_pair_ids_ptr,  # [max_rows] out
    block_experts_ptr,  # [max_rows // BLOCK_M] out
    num_pairs,
    BLOCK_M: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One program per expert: write its pairs, in pair order, into its run, and its id onto its blocks."""
    expert = tl.program_id(0)
    count = tl.load(counts_ptr + expert)
    end = tl.load(padded_ends_ptr + expert)
    start = end - (count + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    placed = 0
    for base in range(0, num_pairs, BLOCK):
        pairs = base + tl.arange(0, BLOCK)  # [BLOCK]
        ids = tl.load(expert_ids_ptr + pairs, mask=pairs < num_pairs, other=-1)
        hit = (ids == expert).to(tl.int32)  # [BLOCK]
        rank = tl.cumsum(hit, 0) - hit  # [BLOCK] this pair's place among the expert's pairs of the chunk
        tl.store(sorted_pair_ids_ptr + start + placed + rank, pairs, mask=hit == 1)
        placed += tl.sum(hit, 0)
    for block in range(start // BLOCK_M, end // BLOCK_M):
        tl.store(block_experts_ptr + block, expert)


def max_layout_rows(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Rows the layout may need: every pair, plus under BLOCK_M of padding per expert that has any pair."""
    return triton.cdiv(num_pairs + min(num_experts, num_pairs) * (block_m - 1), block_m) * block_m


def group_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> ExpertLayout:
    """The expert-major layout of topk_ids [T, top_k]; sizes from shapes only, nothing read on the host."""
    num_pairs = topk_ids.numel()
    expert_ids = topk_ids.reshape(-1).to(torch.int32)  # [P]
    device = topk_ids.device
    counts = torch.zeros(num_experts, dtype=torch.int32, device=device)
    counts.scatter_add_(0, expert_ids.long(), torch.ones_like(expert_ids))  # [E] (integer atomics: exact)
    padded_ends = torch.cumsum((counts + block_m - 1) // block_m * block_m, 0, dtype=torch.int32)  # [E]
    max_rows = max_layout_rows(num_pairs, num_experts, block_m)
    sorted_pair_ids = torch.full((max_rows,), num_pairs, dtype=torch.int32, device=device)  # [max_rows]
    block_experts = torch.zeros(max_rows // block_m, dtype=torch.int32, device=device)  # [num_blocks]
    if num_pairs:
        _place_pairs_kernel[(num_experts,)](
            expert_ids,
            counts,
            padded_ends,
            sorted_pair_ids,
            block_experts,
            num_pairs,
            BLOCK_M=block_m,
            BLOCK=max(32, min(1024, triton.next_power_of_2(num_pairs))),
            num_warps=4,
        )
    return ExpertLayout(sorted_pair_ids, block_experts, padded_ends, block_m)


@triton.jit
def _dot(acc, a, b, DOT_FP32: tl.constexpr):
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b.to(a.dtype), acc)


@triton.jit
def _grouped_gemm_kernel(
    a_ptr,  # [num_rows_of_a, K]: one row per token (A_ROWS_PER_PAIR == 0) or per pair
    w_ptr,  # [num_experts, N or 2N, K]: for GATED, gate rows 0..N-1 then up rows N..2N-1
    out_ptr,  # [num_pairs, N]
    routing_weights_ptr,  # [num_pairs] fp32, read when MUL_ROUTING_WEIGHT
    sorted_pair_ids_ptr,
    block_experts_ptr,
    padded_ends_ptr,
    num_experts,
    num_pairs,
    N,
    K,
    stride_am,
    stride_ak,
    stride_we,
    stride_wn,
    stride_wk,
    stride_om,
    stride_on,
    TOP_K: tl.constexpr,
    A_PER_TOKEN: tl.constexpr,  # a's rows are tokens (pair // TOP_K), else pairs
    GATED: tl.constexpr,
    MUL_ROUTING_WEIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    block = tl.program_id(0)
    if block * BLOCK_M >= tl.load(padded_ends_ptr + num_experts - 1):
        return  # past the rows in use: the grid is sized for the worst case
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    pairs = tl.load(sorted_pair_ids_ptr + rows).to(tl.int64)  # [BLOCK_M]
    row_mask = pairs < num_pairs
    if A_PER_TOKEN:
        a_rows = pairs // TOP_K
    else:
        a_rows = pairs
    expert = tl.load(block_experts_ptr + block).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    col_mask = cols < N
    ks = tl.arange(0, BLOCK_K)  # [BLOCK_K]
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + ks[None, :] * stride_ak  # [BLOCK_M, BLOCK_K]
    w_ptrs = w_ptr + expert * stride_we + cols[None, :] * stride_wn + ks[:, None] * stride_wk  # [BLOCK_K, BLOCK_N]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = ks < K - k0
        a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc = _dot(acc, a, w, DOT_FP32)
        if GATED:
            w_up = tl.load(w_ptrs + N * stride_wn, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
            acc_up = _dot(acc_up, a, w_up, DOT_FP32)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk
    if GATED:
        acc = acc / (1.0 + tl.exp(-acc)) * acc_up  # silu(gate) * up
    if MUL_ROUTING_WEIGHT:
        acc = acc * tl.load(routing_weights_ptr + pairs, mask=row_mask, other=0.0)[:, None]
    out_ptrs = out_ptr + pairs[:, None] * stride_om + cols[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


def _grouped_gemm(
    a: torch.Tensor,
    w: torch.Tensor,
    out: torch.Tensor,
    layout: ExpertLayout,
    routing_weights: torch.Tensor | None,
    top_k: int,
    a_per_token: bool,
    gated: bool,
    cfg: MoeTileConfig,
) -> None:
    num_pairs, n = out.shape
    k = a.shape[1]
    num_blocks = layout.block_experts.shape[0]
    _grouped_gemm_kernel[(num_blocks, triton.cdiv(n, cfg.block_n))](
        a,
        w,
        out,
        out if routing_weights is None else routing_weights,
        layout.sorted_pair_ids,
        layout.block_experts,
        layout.padded_ends,
        w.shape[0],
        num_pairs,
        n,
        k,
        a.stride(0),
        a.stride(1),
        w.stride(0),
        w.stride(1),
        w.stride(2),
        out.stride(0),
        out.stride(1),
        TOP_K=top_k,
        A_PER_TOKEN=a_per_token,
        GATED=gated,
        MUL_ROUTING_WEIGHT=routing_weights is not None,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        DOT_FP32=cfg.dot_fp32,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )


def fused_experts(
    x: torch.Tensor,  # [T, hidden]
    w13: torch.Tensor,  # [E, 2 * I, hidden]: each expert's gate rows, then its up rows
    w2: torch.Tensor,  # [E, hidden, I]
    topk_weights: torch.Tensor,  # [T, top_k] fp32
    topk_ids: torch.Tensor,  # [T, top_k] integer, values in [0, E)
    cfg: MoeTileConfig | None = None,
) -> torch.Tensor:
    """sum_j topk_weights[t, j] * down_e(silu(gate_e(x_t)) * up_e(x_t)) with e = topk_ids[t, j]: [T, hidden]."""
    num_tokens, hidden = x.shape
    num_experts, two_i, _ = w13.shape
    top_k = topk_ids.shape[1]
    _check_inputs(x, w13, w2, topk_weights, topk_ids)
    if num_tokens == 0:
        return torch.zeros_like(x)
    num_pairs = num_tokens * top_k
    if cfg is None:
        cfg = tile_config(num_pairs, num_experts, x.dtype, x.is_cuda)
    layout = group_by_expert(topk_ids, num_experts, cfg.block_m)
    inter = two_i // 2
    activated = torch.empty(num_pairs, inter, dtype=x.dtype, device=x.device)  # [P, I] silu(gate) * up
    _grouped_gemm(x, w13, activated, layout, None, top_k, a_per_token=True, gated=True, cfg=cfg)
    weighted = torch.empty(num_pairs, hidden, dtype=x.dtype, device=x.device)  # [P, hidden]
    routing = topk_weights.reshape(-1).to(torch.float32)  # [P]
    _grouped_gemm(activated, w2, weighted, layout, routing, top_k, a_per_token=False, gated=False, cfg=cfg)
    if top_k == 1:
        return weighted  # [T, hidden]
    return weighted.view(num_tokens, top_k, hidden).sum(dim=1)  # [T, hidden], summed in fp32 by torch


def _check_inputs(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
) -> None:
    """Shapes, dtypes and strides; reads no tensor values, so it never syncs the device."""
    if x.dim() != 2 or w13.dim() != 3 or w2.dim() != 3:
        raise ValueError("fused_experts needs x [T, hidden], w13 [E, 2I, hidden] and w2 [E, hidden, I]")
    num_experts, two_i, hidden = w13.shape
    if hidden != x.shape[1] or two_i % 2 or w2.shape != (num_experts, hidden, two_i // 2):
        raise ValueError(f"expert weights do not fit: x {tuple(x.shape)}, w13 {tuple(w13.shape)}, w2 {tuple(w2.shape)}")
    if topk_ids.dim() != 2 or topk_ids.shape != topk_weights.shape or topk_ids.shape[0] != x.shape[0]:
        raise ValueError(f"topk_ids {tuple(topk_ids.shape)} and topk_weights must both be [T, top_k]")
    if x.dtype != w13.dtype or x.dtype != w2.dtype:
        raise ValueError(f"x ({x.dtype}) and the expert weights ({w13.dtype}, {w2.dtype}) must share a dtype")
    if w13.stride(2) != 1 or w2.stride(2) != 1:
        raise ValueError("expert weights need unit stride along their input dimension")
