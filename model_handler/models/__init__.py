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
    "Gemma2ForCausalLM": ("model_handler.models.gemma", "Gemma2ForCausalLM"),
    "Gemma3ForCausalLM": ("model_handler.models.gemma", "Gemma3ForCausalLM"),
    "Phi3ForCausalLM": ("model_handler.models.phi3", "Phi3ForCausalLM"),
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
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
}


# Architectures people try that are refused at start-up, and why (what to serve instead).
_REFUSED: dict[str, str] = {
    "Gemma3ForConditionalGeneration": (
        "multimodal Gemma 3 (image and text inputs) is not supported yet; the text-only Gemma 3 checkpoints "
        "(Gemma3ForCausalLM: gemma-3-1b, gemma-3-270m) are"
    ),
    "Phi4MMForCausalLM": "Phi-4-multimodal is not supported yet; Phi-4-mini (Phi3ForCausalLM) is",
    "Phi4MultimodalForCausalLM": "Phi-4-multimodal is not supported yet; Phi-4-mini (Phi3ForCausalLM) is",
}
_REFUSED_MODEL_TYPES = {"gemma3": "Gemma3ForConditionalGeneration", "phi4mm": "Phi4MMForCausalLM"}


def supported_architectures() -> list[str]:
    return sorted(_REGISTRY)


def refuse_unsupported(architectures: Sequence[str] | None, model_type: str | None = None) -> None:
    """ValueError naming the architecture when config.json describes one that is known and refused."""
    candidates = list(architectures or [])
    if not candidates and model_type in _REFUSED_MODEL_TYPES:
        candidates = [_REFUSED_MODEL_TYPES[model_type]]
    if candidates and not any(name in _REGISTRY for name in candidates):
        for name in candidates:
            if name in _REFUSED:
                raise ValueError(f"model architecture {name} is refused: {_REFUSED[name]}")


def resolve_architecture(architectures: Sequence[str] | None, model_type: str | None = None) -> str:
    """The first supported name in config.json's `architectures` (or the one model_type implies)."""
    candidates = list(architectures or [])
    if not candidates and model_type in _BY_MODEL_TYPE:
        candidates = [_BY_MODEL_TYPE[model_type]]
    for name in candidates:
        if name in _REGISTRY:
            return name
    refuse_unsupported(candidates)
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
