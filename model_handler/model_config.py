"""The essentials of a model folder's config.json and generation_config.json, read once with AutoConfig.

`ModelConfig` is what the engine sizes things by (KV cache, stop tokens, context length); the model
classes read the full HF config for the rest.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from transformers import AutoConfig, PretrainedConfig

from model_handler.model_layout import (
    RopeLengthRule,
    context_length,
    kv_window,
    layer_sliding_windows,
    rope_length_rule,
)
from model_handler.models import refuse_unsupported, resolve_architecture


def load_hf_config(model_dir: str | Path) -> PretrainedConfig:
    """config.json through AutoConfig, after refusing (with a message naming it) what cannot be served: a quantized
    checkpoint, or an architecture known to be unsupported (some of which AutoConfig could not even read)."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"{model_dir} holds no config.json; expected a Hugging Face model folder")
    raw = json.loads((model_dir / "config.json").read_text())
    quantization = raw.get("quantization_config")
    if quantization:
        method = quantization.get("quant_method", "unnamed") if isinstance(quantization, dict) else quantization
        raise ValueError(
            f"{model_dir} holds a quantized checkpoint (quantization_config: quant_method {method!r}); quantized "
            "weights are not supported yet: serve the unquantized (float16/bfloat16) checkpoint"
        )
    refuse_unsupported(raw.get("architectures"), raw.get("model_type"))
    return AutoConfig.from_pretrained(str(model_dir))


def _as_id_list(value: object) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]  # type: ignore[union-attr]


def _dtype_name(value: object) -> str:
    if value is None:
        return "float32"
    return str(value).removeprefix("torch.")


@dataclass(slots=True)
class ModelConfig:
    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    eos_token_ids: list[int]
    bos_token_id: int | None
    tie_word_embeddings: bool
    torch_dtype: str
    sliding_windows: tuple[int | None, ...] = ()
    """Each layer's attention window in tokens (None: the whole context)."""
    kv_window: int | None = None
    """Set when every layer has a window: KV blocks wholly outside it are freed (the largest window)."""
    rope_length_rule: RopeLengthRule | None = None
    """How a length-dependent rope (longrope, dynamic) picks its frequencies; None for a fixed one."""
    hf_config: PretrainedConfig | None = field(default=None, repr=False, compare=False)
    """The whole config.json as transformers reads it, for the model classes (None when built by hand)."""

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> ModelConfig:
        return cls.from_hf_config(load_hf_config(model_dir), model_dir)

    @classmethod
    def from_hf_config(cls, hf_config: PretrainedConfig, model_dir: str | Path | None = None) -> ModelConfig:
        generation: dict = {}
        if model_dir is not None and (Path(model_dir) / "generation_config.json").is_file():
            generation = json.loads((Path(model_dir) / "generation_config.json").read_text())
        # generation_config.json is what HF's generate() stops on; it may list several ids (Llama 3).
        eos_token_ids = _as_id_list(generation.get("eos_token_id", getattr(hf_config, "eos_token_id", None)))
        bos_token_id = generation.get("bos_token_id", getattr(hf_config, "bos_token_id", None))
        num_heads = hf_config.num_attention_heads
        # The model's own context: a sliding window limits what a layer attends to, not how long a sequence is.
        max_positions = context_length(hf_config)
        windows = layer_sliding_windows(hf_config, max_positions)
        return cls(
            architecture=resolve_architecture(hf_config.architectures, hf_config.model_type),
            model_type=hf_config.model_type,
            vocab_size=hf_config.vocab_size,
            hidden_size=hf_config.hidden_size,
            num_layers=hf_config.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or num_heads,
            head_dim=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads,
            max_position_embeddings=max_positions,
            eos_token_ids=list(dict.fromkeys(eos_token_ids)),
            bos_token_id=bos_token_id,
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            torch_dtype=_dtype_name(getattr(hf_config, "dtype", None)),
            sliding_windows=windows,
            kv_window=kv_window(windows),
            rope_length_rule=rope_length_rule(hf_config),
            hf_config=hf_config,
        )
