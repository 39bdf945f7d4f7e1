"""One-row linear layers (batch-1 decode) as a Triton matrix-vector kernel that streams the weight once.

Why: at one row a linear layer is a pure read of its weight, and cuBLAS's GEMM tiles fall well short of the
memory bandwidth there, with a split-K reduce kernel after the 4096-wide outputs (bench/results/gpu-h100/,
profile-*.json). This kernel gives each program BLOCK_N whole weight rows, reads them in BLOCK_K-wide
coalesced chunks and reduces in fp32 once at the end. Which config (or cuBLAS) runs for a weight shape is
measured on the device (`layers/gpu_linear.py`); here is only the kernel and its configs.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass(frozen=True, slots=True)
class GemvConfig:
    block_n: int  # weight rows (output features) per program
    block_k: int  # input features per loop iteration
    num_warps: int = 4
    num_stages: int = 1
    programs_per_sm: int = 0
    """0: one program per row block. Otherwise a fixed grid of this many programs per SM, each taking every
    grid-th row block, so a row-block count just past a whole number of waves leaves no half-empty wave."""

    def __str__(self) -> str:
        grid = f" grid={self.programs_per_sm}/SM" if self.programs_per_sm else ""
        return f"BLOCK_N={self.block_n} BLOCK_K={self.block_k} warps={self.num_warps} stages={self.num_stages}{grid}"


# Candidates timed per weight shape: narrow row blocks give the 4096-wide outputs enough programs to fill the
# SMs without split-K; wide chunks keep 16-byte loads in flight.
CONFIGS = (
    GemvConfig(4, 1024),
    GemvConfig(8, 512),
    GemvConfig(8, 1024),
    GemvConfig(16, 512),
    GemvConfig(16, 512, num_warps=8),
    GemvConfig(32, 256),
    GemvConfig(32, 512, num_warps=8),
    GemvConfig(8, 1024, num_stages=3),
    GemvConfig(16, 512, num_stages=3),
    GemvConfig(4, 2048),
    GemvConfig(8, 512, num_warps=2),
    # Fixed grids sized to the programs an SM holds at these configs' register counts (sm_90: 64, 77, 134, 148).
    GemvConfig(4, 1024, programs_per_sm=8),
    GemvConfig(8, 512, programs_per_sm=6),
    GemvConfig(8, 1024, programs_per_sm=3),
    GemvConfig(16, 512, programs_per_sm=3),
)


@triton.jit
def _gemv_row_block(
    x_ptr,
    w_ptr,
    bias_ptr,
    y_ptr,
    row_block,
    N,
    K,
    stride_w,
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = row_block * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    row_mask = rows < N
    cols = tl.arange(0, BLOCK_K)  # [BLOCK_K]
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * stride_w  # [BLOCK_N, 1]
    # Products accumulate elementwise; one cross-thread reduction after the loop, not one per chunk.
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        ks = k + cols
        if EVEN_K:
            x = tl.load(x_ptr + ks).to(tl.float32)  # [BLOCK_K]
            w = tl.load(w_rows + ks[None, :], mask=row_mask[:, None], other=0.0)  # [BLOCK_N, BLOCK_K]
        else:
            k_mask = ks < K
            x = tl.load(x_ptr + ks, mask=k_mask, other=0.0).to(tl.float32)
            w = tl.load(w_rows + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        acc += w.to(tl.float32) * x[None, :]
    y = tl.sum(acc, axis=1)  # [BLOCK_N]
    if HAS_BIAS:
        y += tl.load(bias_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=row_mask)


@triton.jit
def _gemv_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    y_ptr,
    N,
    K,
    stride_w,
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,
    STRIDED_GRID: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    if STRIDED_GRID:  # a fixed grid: each program takes every grid-th row block
        for row_block in range(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.num_programs(0)):
            _gemv_row_block(
                x_ptr, w_ptr, bias_ptr, y_ptr, row_block, N, K, stride_w, HAS_BIAS, EVEN_K, BLOCK_N, BLOCK_K
            )
    else:  # a program per row block
        _gemv_row_block(
            x_ptr, w_ptr, bias_ptr, y_ptr, tl.program_id(0), N, K, stride_w, HAS_BIAS, EVEN_K, BLOCK_N, BLOCK_K
        )


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, config: GemvConfig) -> torch.Tensor:
    """F.linear(x, weight, bias) for one row: x [1, K], weight [N, K] (unit stride along K) -> [1, N]."""
    if x.dim() != 2 or x.shape[0] != 1 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"gemv takes one row [1, {weight.shape[1]}], got {tuple(x.shape)}")
    if x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError("gemv needs unit stride along the input features")
    n, k = weight.shape
    y = torch.empty(1, n, dtype=x.dtype, device=x.device)  # [1, N]
    num_programs = triton.cdiv(n, config.block_n)
    if config.programs_per_sm:
        num_programs = min(num_programs, config.programs_per_sm * _num_sms(x.device))
    _gemv_kernel[(num_programs,)](
        x,
        weight,
        bias if bias is not None else weight,  # never read without HAS_BIAS
        y,
        n,
        k,
        weight.stride(0),
        HAS_BIAS=bias is not None,
        EVEN_K=k % config.block_k == 0,
        STRIDED_GRID=config.programs_per_sm > 0,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return y


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 2  # the interpreter on CPU: a small grid, so the tests cover the striding
    return torch.cuda.get_device_properties(device).multi_processor_count
