"""Fused Triton kernels for a decoder layer's elementwise work: residual add + RMSNorm, SiLU-and-mul, rotary.

Why: at batch 1 a decode step spends a fair share of its GPU time in the small torch ops between the matmuls
(RMSNorm and its residual add, the three ops of the rotary, SiLU then multiply), each a separate launch of a few
microseconds (`bench/gpu_profile.py` shows them). One launch each here. Every kernel
computes in fp32 and rounds once on store; `reference`-style torch versions live in the layers and are
what these are tested against (tests/model_handler/kernels/test_triton_fused.py, under TRITON_INTERPRET=1).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _add_rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    residual_out_ptr,
    stride_x,
    stride_residual,
    stride_out,
    stride_residual_out,
    hidden_size,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden_size
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + row * stride_residual + cols, mask=mask, other=0.0)
        # Rounded to the model dtype before the norm, as the unfused `x + residual` would be.
        x = (x.to(tl.float32) + residual.to(tl.float32)).to(residual_out_ptr.dtype.element_ty)
        tl.store(residual_out_ptr + row * stride_residual_out + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / hidden_size + eps)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (xf * rstd * weight).to(out_ptr.dtype.element_ty), mask=mask)


def add_rms_norm(
    x: torch.Tensor,  # [T, hidden]
    residual: torch.Tensor | None,  # [T, hidden] or None (the first layer)
    weight: torch.Tensor,  # [hidden]
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual) * weight, x + residual); with residual None, (rms_norm(x) * weight, x)."""
    num_tokens, hidden_size = x.shape
    if x.stride(-1) != 1 or (residual is not None and residual.stride(-1) != 1):
        raise ValueError("add_rms_norm needs rows with unit stride")
    out = torch.empty_like(x)  # [T, hidden]
    residual_out = x if residual is None else torch.empty_like(x)  # [T, hidden]
    if num_tokens:
        _add_rms_norm_kernel[(num_tokens,)](
            x,
            x if residual is None else residual,
            weight,
            out,
            residual_out,
            x.stride(0),
            x.stride(0) if residual is None else residual.stride(0),
            out.stride(0),
            residual_out.stride(0),
            hidden_size,
            eps,
            HAS_RESIDUAL=residual is not None,
            BLOCK=triton.next_power_of_2(hidden_size),
            num_warps=8 if hidden_size >= 4096 else 4,
        )
    return out, residual_out


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_out, d, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + d + cols, mask=mask, other=0.0).to(tl.float32)
    out = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


SILU_BLOCK = 1024


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for x = [gate | up] along the last dim: [T, 2d] -> [T, d]."""
    num_tokens, width = x.shape
    d = width // 2
    if x.stride(-1) != 1:
        raise ValueError("silu_and_mul needs rows with unit stride")
    out = torch.empty(num_tokens, d, dtype=x.dtype, device=x.device)  # [T, d]
    if num_tokens:
        _silu_and_mul_kernel[(num_tokens, triton.cdiv(d, SILU_BLOCK))](
            x, out, x.stride(0), out.stride(0), d, BLOCK=SILU_BLOCK, num_warps=4
        )
    return out


@triton.jit
def _rotary_kernel(
    x_ptr,
    cache_ptr,
    positions_ptr,
    stride_x_t,
    stride_x_h,
    stride_cache_p,
    stride_cache_kind,
    num_heads,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H]
    dims = tl.arange(0, BLOCK_HALF)  # [BLOCK_HALF]
    position = tl.load(positions_ptr + token).to(tl.int64)
    row = cache_ptr + position * stride_cache_p
    # The table's cos repeats over both halves and its sin is sign-folded: first half -sin, second +sin.
    cos = tl.load(row + dims, mask=dims < HALF, other=0.0).to(tl.float32)[None, :]  # [1, BLOCK_HALF]
    sin = tl.load(row + stride_cache_kind + HALF + dims, mask=dims < HALF, other=0.0).to(tl.float32)[None, :]
    mask = (heads[:, None] < num_heads) & (dims[None, :] < HALF)  # [BLOCK_H, BLOCK_HALF]
    first = x_ptr + token * stride_x_t + heads[:, None] * stride_x_h + dims[None, :]
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(first + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(first, (x1 * cos - x2 * sin).to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(first + HALF, (x2 * cos + x1 * sin).to(x_ptr.dtype.element_ty), mask=mask)


ROTARY_BLOCK_H = 8


def rotary_(
    x: torch.Tensor,  # [T, num_heads, head_dim], any token/head strides, unit stride along head_dim
    cos_sin_cache: torch.Tensor,  # [max_position, 2, rotary_dim]: cos, sign-folded sin (RotaryEmbedding)
    positions: torch.Tensor,  # [T] int64
) -> torch.Tensor:
    """Rotate the first rotary_dim dims of every head in place (HF's rotate_half convention); returns x."""
    num_tokens, num_heads, head_dim = x.shape
    rotary_dim = cos_sin_cache.shape[-1]
    if x.stride(-1) != 1 or cos_sin_cache.stride(-1) != 1 or rotary_dim > head_dim or rotary_dim % 2:
        raise ValueError("rotary_ needs unit-stride head dims and an even rotary_dim <= head_dim")
    if num_tokens:
        half = rotary_dim // 2
        _rotary_kernel[(num_tokens, triton.cdiv(num_heads, ROTARY_BLOCK_H))](
            x,
            cos_sin_cache,
            positions,
            x.stride(0),
            x.stride(1),
            cos_sin_cache.stride(0),
            cos_sin_cache.stride(1),
            num_heads,
            HALF=half,
            BLOCK_H=ROTARY_BLOCK_H,
            BLOCK_HALF=triton.next_power_of_2(half),
            num_warps=4,
        )
    return x
