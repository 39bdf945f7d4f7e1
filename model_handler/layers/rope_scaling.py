"""Ropes whose frequencies depend on the sequence length, as transformers' `dynamic_rope_update` applies them.

transformers picks the frequencies of a forward from its longest position: `longrope` switches from its short to
its long factors once that passes original_max_position_embeddings; `dynamic` rescales its base to the length
once it passes max_position_embeddings. Each token here carries that length (`rope_length`, see `model_layout`), and
its rotation is the one transformers' `generate()` gives it. The table's rows follow the decode rule (length =
position + 1), so decode steps (CUDA graphs included) index it by position alone; a prompt longer than the
threshold takes other rows (longrope: the long factors below the threshold too, kept after the table) or rows made
for the step (dynamic: its length's base).
"""

from __future__ import annotations

from typing import Protocol

import torch
from transformers import PretrainedConfig

from model_handler.layers.rope_tables import cos_sin_rows, rope_inv_freq
from model_handler.model_layout import rope_length_rule, rope_parameter_sets, rope_type_of


class LengthScaling(Protocol):
    def table(self, max_position: int) -> torch.Tensor: ...  # [rows, 2, rotary_dim] fp32 on the CPU

    def table_index(self, positions: torch.Tensor, rope_lengths: torch.Tensor) -> torch.Tensor: ...

    def rows(self, positions: torch.Tensor, rope_lengths: torch.Tensor) -> torch.Tensor | None: ...


class LongRopeScaling:
    """Short factors while the length is within `original` positions, long ones past it. Rows: 0..max_position-1
    by the decode rule (short below `original`, long from it), then the long rows of positions 0..original-1."""

    def __init__(self, hf_config: PretrainedConfig, head_dim: int, layer_type: str | None, original: int) -> None:
        self.original = original
        self.short_inv_freq, self.attention_scaling = rope_inv_freq(hf_config, head_dim, layer_type)
        # transformers computes the long set with seq_len = original + 1 (`longrope_frequency_update`)
        self.long_inv_freq, _ = rope_inv_freq(hf_config, head_dim, layer_type, seq_len=original + 1)
        self.max_position = 0

    def table(self, max_position: int) -> torch.Tensor:
        self.max_position = max_position
        positions = torch.arange(max_position)
        short = cos_sin_rows(positions[: self.original], self.short_inv_freq, self.attention_scaling)
        long = cos_sin_rows(positions, self.long_inv_freq, self.attention_scaling)
        return torch.cat((short, long[self.original :], long[: self.original]))  # [max_position + original, 2, rot]

    def table_index(self, positions: torch.Tensor, rope_lengths: torch.Tensor) -> torch.Tensor:
        long_early = (rope_lengths > self.original) & (positions < self.original)  # a long prompt's first tokens
        return torch.where(long_early, positions + self.max_position, positions)

    def rows(self, positions: torch.Tensor, rope_lengths: torch.Tensor) -> torch.Tensor | None:
        return None


class DynamicNtkScaling:
    """The base rescaled to the length once it passes `threshold` (= max_position_embeddings). Rows by the decode
    rule; a prompt longer than the threshold gets rows made for the step (only prefill steps carry such tokens)."""

    def __init__(self, hf_config: PretrainedConfig, head_dim: int, layer_type: str | None, threshold: int) -> None:
        self.hf_config, self.head_dim, self.layer_type = hf_config, head_dim, layer_type
        self.threshold = threshold
        self.inv_freq, self.attention_scaling = rope_inv_freq(hf_config, head_dim, layer_type)

    def inv_freq_for(self, lengths: torch.Tensor) -> torch.Tensor:
        """[N, rotary_dim // 2]: transformers' frequencies for each length (its own formula, one row per length)."""
        lengths = lengths.to("cpu", torch.int64)
        rescaled, _ = rope_inv_freq(self.hf_config, self.head_dim, self.layer_type, seq_len=lengths[:, None])
        return torch.where((lengths > self.threshold)[:, None], rescaled, self.inv_freq[None, :])

    def table(self, max_position: int) -> torch.Tensor:
        positions = torch.arange(max_position)
        return cos_sin_rows(positions, self.inv_freq_for(positions + 1), self.attention_scaling)

    def table_index(self, positions: torch.Tensor, rope_lengths: torch.Tensor) -> torch.Tensor:
        return positions

    def rows(self, positions: torch.Tensor, rope_lengths: torch.Tensor) -> torch.Tensor | None:
        """The step's rows when a token's length exceeds both its position + 1 and the threshold, else None (a host
        sync: prefill steps only, which run eagerly)."""
        if not bool(((rope_lengths > positions + 1) & (rope_lengths > self.threshold)).any()):
            return None
        lengths = torch.maximum(rope_lengths, positions + 1)
        return cos_sin_rows(positions, self.inv_freq_for(lengths), self.attention_scaling)


def length_scaling(hf_config: PretrainedConfig, head_dim: int, layer_type: str | None) -> LengthScaling | None:
    """The length-dependent behaviour of the rope of `layer_type`, or None for a rope fixed at start-up."""
    kind = rope_type_of(rope_parameter_sets(hf_config)[layer_type])
    rule = rope_length_rule(hf_config)
    if kind == "longrope" and rule is not None:
        return LongRopeScaling(hf_config, head_dim, layer_type, rule.threshold)
    if kind == "dynamic" and rule is not None:
        return DynamicNtkScaling(hf_config, head_dim, layer_type, rule.threshold)
    return None
