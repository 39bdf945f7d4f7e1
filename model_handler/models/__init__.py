"""Architecture registry: HF `architectures` name -> our model class (imported lazily, so naming a model
does not import torch). What every model class offers the engine: `causal_lm.CausalLM`."""

from __future__ import annotations

import importlib
from collections.abc import Sequence

# architecture name -> (module, class); one module per family
_REGISTRY: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("model_handler.models.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("model_handler.models.llama", "MistralForCausalLM"),
    "Qwen2ForCausalLM": ("model_handler.models.llama", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("model_handler.models.llama", "Qwen3ForCausalLM"),
    "MixtralForCausalLM": ("model_handler.models.mixtral", "MixtralForCausalLM"),
    "Qwen2MoeForCausalLM": ("model_handler.models.qwen_moe", "Qwen2MoeForCausalLM"),
    "Qwen3MoeForCausalLM": ("model_handler.models.qwen_moe", "Qwen3MoeForCausalLM"),
}
# config.json without `architectures` (a bare config class saved by hand): fall back on model_type
_BY_MODEL_TYPE = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}


def supported_architectures() -> list[str]:
    return sorted(_REGISTRY)


def resolve_architecture(architectures: Sequence[str] | None, model_type: str | None = None) -> str:
    """The first supported name in config.json's `architectures` (or the one model_type implies)."""
    candidates = list(architectures or [])
    if not candidates and model_type in _BY_MODEL_TYPE:
        candidates = [_BY_MODEL_TYPE[model_type]]
    for name in candidates:
        if name in _REGISTRY:
            return name
    raise ValueError(
        f"unsupported model architecture {candidates or model_type!r}; "
        f"supported: {', '.join(supported_architectures())}"
    )


def get_model_class(architecture: str) -> type:
    if architecture not in _REGISTRY:
        raise ValueError(
            f"unsupported model architecture {architecture!r}; supported: {', '.join(supported_architectures())}"
        )
    module_name, class_name = _REGISTRY[architecture]
    return getattr(importlib.import_module(module_name), class_name)
