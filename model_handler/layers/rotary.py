"""Rotary position embedding: a cos/sin table built once from HF's rope init functions, applied with one
roll and one fused multiply-add instead of HF's `rotate_half` formula (same result).

Every rope type transformers knows (default, linear, dynamic, yarn, longrope, llama3) is computed by
`transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS`. "dynamic" and "longrope" keep their frequencies for
the original context; HF recomputes them once a sequence outgrows it, so beyond that point they differ.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

if TYPE_CHECKING:
    from model_handler.kernels import FusedKernels


def rope_inv_freq(hf_config: PretrainedConfig, head_dim: int) -> tuple[torch.Tensor, float]:
    """(inv_freq [rotary_dim // 2] fp32, attention_scaling) exactly as HF's rotary embedding computes them."""
    params = getattr(hf_config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        base = params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").to(torch.float32) / head_dim
        return 1.0 / (base**exponents), 1.0
    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"unsupported rope_type {rope_type!r}; known: default, {', '.join(ROPE_INIT_FUNCTIONS)}")
    with torch.device("cpu"):  # HF's helpers make some tensors without a device; keep them off the loader's GPU
        inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, torch.device("cpu"))
    return inv_freq.to(torch.float32), float(attention_scaling)


class RotaryEmbedding(nn.Module):
    """Owns `cos_sin_cache` [max_position, 2, rotary_dim]: row p holds cos(p·f) and sign-folded sin(p·f)."""

    def __init__(
        self,
        inv_freq: torch.Tensor,
        attention_scaling: float,
        max_position: int,
        dtype: torch.dtype,
        fused: FusedKernels | None = None,
    ) -> None:
        super().__init__()
        self.fused = fused  # the attention backend's kernels: one in-place launch per layer, no lookup
        self.rotary_dim = 2 * inv_freq.numel()
        # Built on the CPU in fp32 whatever the target, then moved to the default device (the loader's).
        positions = torch.arange(max_position, dtype=torch.float32, device="cpu")
        freqs = torch.outer(positions, inv_freq.to("cpu", torch.float32))  # [max_position, rotary_dim // 2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [max_position, rotary_dim]
        cos = emb.cos() * attention_scaling
        sin = emb.sin() * attention_scaling
        half = self.rotary_dim // 2
        # rotate_half(x) = cat(-x2, x1) = roll(x, half) * [-1.., +1..]: fold the sign into sin once here.
        sin[:, :half] = -sin[:, :half]
        cache = torch.stack((cos, sin), dim=1)  # [max_position, 2, rotary_dim]
        self.register_buffer("cos_sin_cache", cache.to(torch.get_default_device(), dtype), persistent=False)

    def lookup(self, positions: torch.Tensor) -> RopeRows:
        """This step's rotation, shared by every layer."""
        if self.fused is not None:
            return RopeRows(positions=positions, cache=self.cos_sin_cache, fused=self.fused)
        rows = self.cos_sin_cache.index_select(0, positions)  # [num_tokens, 2, rotary_dim]
        return RopeRows(cos=rows[:, 0:1], sin=rows[:, 1:2])


@dataclass(slots=True)
class RopeRows:
    """Either the step's (cos, sin) rows, each [num_tokens, 1, rotary_dim], or what the fused kernel reads."""

    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None
    positions: torch.Tensor | None = None  # [num_tokens] int64, with `cache` and `fused`
    cache: torch.Tensor | None = None  # [max_position, 2, rotary_dim]
    fused: FusedKernels | None = None

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate x [num_tokens, num_heads, head_dim]; the fused kernel does it in place and returns x."""
        if self.fused is not None:
            return self.fused.rotary_(x, self.cache, self.positions)
        return apply_rotary(x, (self.cos, self.sin))


def apply_rotary(x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate x [num_tokens, num_heads, head_dim] (any row stride) by `lookup`'s rows; returns a new tensor."""
    cos, sin = cos_sin  # [num_tokens, 1, rotary_dim] each
    rotary_dim = cos.shape[-1]
    if rotary_dim == x.shape[-1]:
        return torch.addcmul(x * cos, x.roll(rotary_dim // 2, dims=-1), sin)
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    rotated = torch.addcmul(rot * cos, rot.roll(rotary_dim // 2, dims=-1), sin)
    return torch.cat((rotated, rest), dim=-1)  # [num_tokens, num_heads, head_dim]
