"""Rope frequencies and cos/sin rows exactly as transformers computes them, for every rope type it knows and each
layer type of a model with several ropes (Gemma 3's local and global layers)."""

from __future__ import annotations

import torch
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from model_handler.model_layout import rope_parameter_sets, rope_type_of


def rope_inv_freq(
    hf_config: PretrainedConfig, head_dim: int, layer_type: str | None = None, seq_len: torch.Tensor | None = None
) -> tuple[torch.Tensor, float]:
    """(inv_freq [rotary_dim // 2] fp32, attention_scaling) exactly as HF's rotary embedding computes them, for the
    rope of `layer_type` (a key of `rope_parameter_sets`) and, for the length-dependent types, a sequence length
    (a [N, 1] tensor gives [N, rotary_dim // 2])."""
    params = rope_parameter_sets(hf_config)[layer_type]
    rope_type = rope_type_of(params)
    if rope_type == "default":
        base = params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
        partial = params.get("partial_rotary_factor", getattr(hf_config, "partial_rotary_factor", None) or 1.0)
        dim = int(head_dim * partial)
        exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").to(torch.float32) / dim
        return 1.0 / (base**exponents), 1.0
    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"unsupported rope_type {rope_type!r}; known: default, {', '.join(ROPE_INIT_FUNCTIONS)}")
    kwargs: dict = {} if layer_type is None else {"layer_type": layer_type}
    if seq_len is not None:
        kwargs["seq_len"] = seq_len
    with torch.device("cpu"):  # HF's helpers make some tensors without a device; keep them off the loader's GPU
        inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, torch.device("cpu"), **kwargs)
    return inv_freq.to(torch.float32), float(attention_scaling)


def cos_sin_rows(positions: torch.Tensor, inv_freq: torch.Tensor, attention_scaling: float) -> torch.Tensor:
    """[P, 2, rotary_dim] fp32 on the CPU: cos(p·f) and sign-folded sin(p·f) for positions [P] and inv_freq
    [rotary_dim // 2] (or one row of frequencies per position, [P, rotary_dim // 2])."""
    freqs = positions.to("cpu", torch.float32)[:, None] * inv_freq.to("cpu", torch.float32)  # [P, rotary_dim // 2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [P, rotary_dim]
    cos = emb.cos() * attention_scaling
    sin = emb.sin() * attention_scaling
    half = emb.shape[-1] // 2
    # rotate_half(x) = cat(-x2, x1) = roll(x, half) * [-1.., +1..]: fold the sign into sin once here.
    sin[:, :half] = -sin[:, :half]
    return torch.stack((cos, sin), dim=1)  # [P, 2, rotary_dim]
