"""Factories for model tests: tiny random HF checkpoints of each family, and flat paged batches to run them on."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
)

from model_handler.layers.attention_metadata import AttentionMetadata

_COMMON = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=80,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
)


def family_config(name: str) -> PretrainedConfig:
    """A small config of one family member, built with transformers' own config class."""
    if name == "llama_gqa":
        return LlamaConfig(
            **_COMMON, num_key_value_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 500000.0}
        )
    if name == "llama_mha_bias_tied":
        return LlamaConfig(
            **_COMMON, num_key_value_heads=4, attention_bias=True, mlp_bias=True, tie_word_embeddings=True
        )
    if name == "llama3_rope":
        return LlamaConfig(
            **_COMMON,
            num_key_value_heads=1,
            tie_word_embeddings=True,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        )
    if name == "llama_yarn":  # attention_scaling != 1 folds into the cos/sin table
        return LlamaConfig(
            **_COMMON,
            num_key_value_heads=2,
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        )
    if name == "mistral":
        # head_dim given explicitly and different from hidden_size // num_heads, as in Mistral Nemo
        return MistralConfig(**_COMMON, num_key_value_heads=2, head_dim=24, sliding_window=None)
    if name == "qwen2":
        return Qwen2Config(**_COMMON, num_key_value_heads=2, tie_word_embeddings=True)
    if name == "qwen3":
        return Qwen3Config(**_COMMON, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False)
    raise ValueError(f"unknown family {name!r}")


FAMILIES = ["llama_gqa", "llama_mha_bias_tied", "llama3_rope", "llama_yarn", "mistral", "qwen2", "qwen3"]

WINDOW = 6
"""Sliding windows of the families below: smaller than the tests' prompts plus outputs, so a window really matters."""
LONGROPE_ORIGINAL = 8
"""Where the longrope family switches to its long factors (original_max_position_embeddings)."""
DYNAMIC_MAX_POSITIONS = 12
"""max_position_embeddings of the dynamic-rope family: its base rescales past it (the context is 4x that)."""


def windowed_family_config(name: str) -> PretrainedConfig:
    """A small config of a family with sliding windows, soft-capping or a length-dependent rope, built with
    transformers' own config class (3 layers, so windowed and full layers alternate where the family does)."""
    common = {**_COMMON, "num_hidden_layers": 3, "num_key_value_heads": 2}
    if name == "mistral_v01":  # every layer slides
        return MistralConfig(**common, sliding_window=WINDOW)
    if name == "qwen2_window":  # layers from max_window_layers on slide
        return Qwen2Config(**common, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)
    if name == "gemma2":  # windowed, full, windowed; soft-capped attention and final logits; its own softmax scale
        return Gemma2Config(
            **common,
            head_dim=16,
            query_pre_attn_scalar=24,
            sliding_window=WINDOW,
            attn_logit_softcapping=5.0,
            final_logit_softcapping=3.0,
            pad_token_id=0,
        )
    if name == "gemma3":  # local, local, global; q/k norms; a local rope base and a scaled global rope
        return Gemma3TextConfig(
            **common,
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=WINDOW,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1000000.0},
            },
            pad_token_id=0,
        )
    if name == "phi3_longrope":  # Phi-4-mini's shape: partial rotary, GQA, tied embeddings, longrope
        rotary_half = int(16 * 0.75) // 2
        return Phi3Config(
            **common,
            partial_rotary_factor=0.75,
            tie_word_embeddings=True,
            original_max_position_embeddings=LONGROPE_ORIGINAL,
            rope_scaling={
                "type": "longrope",
                "short_factor": [1.0 + 0.1 * i for i in range(rotary_half)],
                "long_factor": [2.0 + 1.5 * i for i in range(rotary_half)],
            },
            pad_token_id=0,
        )
    if name == "phi3_window":  # Phi-3-mini-4k's shape: a window on every layer
        return Phi3Config(**common, sliding_window=WINDOW, pad_token_id=0)
    if name == "llama_dynamic":
        return LlamaConfig(
            **{**common, "max_position_embeddings": DYNAMIC_MAX_POSITIONS},
            rope_parameters={"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0},
        )
    raise ValueError(f"unknown family {name!r}")


WINDOWED_FAMILIES = ["mistral_v01", "qwen2_window", "gemma2", "gemma3", "phi3_longrope", "phi3_window", "llama_dynamic"]


def save_random_model(config: PretrainedConfig, out_dir: Path, seed: int = 0) -> torch.nn.Module:
    """Save an HF model with every parameter random (biases and norm weights too) and return it in fp32."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)  # non-trivial gains, but still a normalisation
            else:
                param.normal_(0.0, 0.15)  # larger than HF's 0.02 so attention is far from uniform
    model.save_pretrained(out_dir)
    return model.eval()


@dataclass
class PagedBatches:
    """Builds the flat batch of each step over a paged cache whose block ids are handed out shuffled."""

    block_size: int
    num_blocks: int
    seed: int = 0
    seq_tokens: list[list[int]] = field(default_factory=list)
    block_tables: list[list[int]] = field(default_factory=list)
    prompt_lens: list[int] = field(default_factory=list)
    """Each sequence's prompt length, what rope lengths are counted from (as the runner does); a sequence not listed
    takes its first chunk as its prompt."""

    def __post_init__(self) -> None:
        generator = torch.Generator().manual_seed(self.seed)
        self._free = torch.randperm(self.num_blocks, generator=generator).tolist()

    def step(self, new_tokens: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """(input_ids, positions, metadata) for appending new_tokens[i] to sequence i (new ones start empty)."""
        while len(self.seq_tokens) < len(new_tokens):
            self.seq_tokens.append([])
            self.block_tables.append([])
            if len(self.prompt_lens) < len(self.seq_tokens):
                self.prompt_lens.append(len(new_tokens[len(self.seq_tokens) - 1]))
        input_ids, positions, slots, query_lens, seq_lens, rope_lengths = [], [], [], [], [], []
        for i, tokens in enumerate(new_tokens):
            start = len(self.seq_tokens[i])
            rope_lengths += [max(pos + 1, self.prompt_lens[i]) for pos in range(start, start + len(tokens))]
            self.seq_tokens[i].extend(tokens)
            while len(self.block_tables[i]) * self.block_size < len(self.seq_tokens[i]):
                self.block_tables[i].append(self._free.pop())
            for pos in range(start, start + len(tokens)):
                block = self.block_tables[i][pos // self.block_size]
                slots.append(block * self.block_size + pos % self.block_size)
                positions.append(pos)
            input_ids.extend(tokens)
            query_lens.append(len(tokens))
            seq_lens.append(len(self.seq_tokens[i]))
        max_blocks = max(len(table) for table in self.block_tables[: len(new_tokens)])
        tables = torch.full((len(new_tokens), max_blocks), -1, dtype=torch.int32)
        for i in range(len(new_tokens)):
            tables[i, : len(self.block_tables[i])] = torch.tensor(self.block_tables[i], dtype=torch.int32)
        metadata = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            query_start_loc=torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
            block_tables=tables,
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
            rope_lengths=torch.tensor(rope_lengths, dtype=torch.int64),
        )
        return torch.tensor(input_ids, dtype=torch.int64), torch.tensor(positions, dtype=torch.int64), metadata


def make_kv_caches(
    num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, dtype=torch.float32
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    return [(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)) for _ in range(num_layers)]


def hf_logits(hf_model: torch.nn.Module, token_ids: list[int]) -> torch.Tensor:
    """HF's logits for every position of one unpadded sequence: [len, vocab]."""
    with torch.no_grad():
        return hf_model(torch.tensor([token_ids])).logits[0].float()


class HFIncremental:
    """transformers' forward fed as `generate()` feeds it: each sequence's tokens in the chunks they arrive in, over
    its own cache. A length-dependent rope picks its frequencies per forward, so this, not one forward over the
    whole sequence, is what the engine must reproduce."""

    def __init__(self, hf_model: torch.nn.Module) -> None:
        self.hf_model = hf_model
        self.caches: dict[int, object] = {}

    def logits(self, seq: int, new_tokens: list[int]) -> torch.Tensor:
        """[len(new_tokens), vocab]: the next sequence chunk of sequence `seq`."""
        from transformers import DynamicCache

        cache = self.caches.setdefault(seq, DynamicCache(config=self.hf_model.config))
        with torch.no_grad():
            out = self.hf_model(torch.tensor([new_tokens]), past_key_values=cache, use_cache=True)
        return out.logits[0].float()
