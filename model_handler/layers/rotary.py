"""Rotary position embedding: a cos/sin table built once from HF's rope init functions, applied with one
roll and one fused multiply-add instead of HF's `rotate_half` formula (same result).

Every rope type transformers knows (default, linear, dynamic, yarn, longrope, llama3) is computed by
`transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS`, per layer type where a model has several (Gemma 3's local
and global layers). "dynamic" and "longrope" change their frequencies with the sequence length as transformers
does (`rope_scaling.py`): each token carries the length its rotation is chosen for (`model_layout`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import PretrainedConfig

from model_handler.layers.rope_scaling import LengthScaling, length_scaling
from model_handler.layers.rope_tables import cos_sin_rows, rope_inv_freq

if TYPE_CHECKING:
    from model_handler.kernels import FusedKernels


class RotaryEmbedding(nn.Module):
    """Owns `cos_sin_cache` [max_position (+ extra rows), 2, rotary_dim]: row p holds cos(p·f) and sign-folded
    sin(p·f); a length-dependent rope (`scaling`) lays out its rows itself and maps (position, rope length) to them."""

    def __init__(
        self,
        inv_freq: torch.Tensor,
        attention_scaling: float,
        max_position: int,
        dtype: torch.dtype,
        fused: FusedKernels | None = None,
        scaling: LengthScaling | None = None,
    ) -> None:
        super().__init__()
        self.fused = fused  # the attention backend's kernels: one in-place launch per layer, no lookup
        self.rotary_dim = 2 * inv_freq.numel()
        self.scaling = scaling
        self.dtype = dtype
        # Built on the CPU in fp32 whatever the target, then moved to the default device (the loader's).
        if scaling is None:
            cache = cos_sin_rows(torch.arange(max_position), inv_freq, attention_scaling)
        else:
            cache = scaling.table(max_position)
        self.register_buffer("cos_sin_cache", cache.to(torch.get_default_device(), dtype), persistent=False)

    def lookup(self, positions: torch.Tensor, rope_lengths: torch.Tensor | None = None) -> RopeRows:
        """This step's rotation, shared by every layer. `rope_lengths` [num_tokens]: the sequence length each token's
        rotation is chosen for (only a length-dependent rope reads it; None means position + 1 for every token)."""
        if self.scaling is not None and rope_lengths is not None:
            rows = self.scaling.rows(positions, rope_lengths)  # rotations no table row holds (dynamic, long prompts)
            if rows is not None:
                rows = rows.to(positions.device, self.dtype)  # [num_tokens, 2, rotary_dim]
                return RopeRows(cos=rows[:, 0:1], sin=rows[:, 1:2])
            positions = self.scaling.table_index(positions, rope_lengths)
        if self.fused is not None:
            return RopeRows(positions=positions, cache=self.cos_sin_cache, fused=self.fused)
        rows = self.cos_sin_cache.index_select(0, positions)  # [num_tokens, 2, rotary_dim]
        return RopeRows(cos=rows[:, 0:1], sin=rows[:, 1:2])


def build_rotary(
    hf_config: PretrainedConfig,
    head_dim: int,
    max_position: int,
    dtype: torch.dtype,
    fused: FusedKernels | None = None,
    layer_type: str | None = None,
) -> RotaryEmbedding:
    """The rotary embedding of the rope of `layer_type` (a key of `rope_parameter_sets`), for positions below
    `max_position`."""
    inv_freq, attention_scaling = rope_inv_freq(hf_config, head_dim, layer_type)
    scaling = length_scaling(hf_config, head_dim, layer_type)
    return RotaryEmbedding(inv_freq, attention_scaling, max_position, dtype, fused, scaling)


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
