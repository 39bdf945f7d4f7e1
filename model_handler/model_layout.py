"""What a model's config says about its attention layout that the engine (not only the model) must know: each
layer's sliding window, the window outside which KV blocks can be freed, the context length, and how a rope whose
frequencies depend on the sequence length (`longrope`, `dynamic`) picks them. Torch-free.

transformers is the oracle: `layer_types` (Gemma 2/3, Qwen2/3) says which layers slide, else `sliding_window`
applies to every layer (Mistral v0.1, Phi-3) unless `use_sliding_window` is false; a layer with a window attends
to the keys p - window < k <= p. A length-dependent rope picks its frequencies, for every token of a forward, from
the longest sequence in it (`dynamic_rope_update`); in `generate()` that is the prompt length for the prompt's
tokens and position + 1 for each later one, so the engine gives every token `rope_length` = max(position + 1,
base length), base length being the prompt's: the same rotation whatever the chunking, batching or recomputation.
transformers' Phi-3 goes further: the first time a sequence passes original_max_position_embeddings, generate()
drops its cache and recomputes every token with the long factors (`Phi3ForCausalLM.prepare_inputs_for_generation`);
the scheduler restarts such a sequence alike, its base length then being its length at the restart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


def rope_parameter_sets(hf_config: Any) -> dict[str | None, dict]:
    """The rope parameters of each layer type ({None: params} for a model with one rope), as transformers 5
    standardises them (`rope_parameters`, nested by layer type for Gemma 3); older configs' `rope_scaling`
    and `rope_theta` are read too."""
    params = getattr(hf_config, "rope_parameters", None)
    if params is None:
        scaling = dict(getattr(hf_config, "rope_scaling", None) or {})
        scaling.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
        params = scaling
    labels = set(getattr(hf_config, "layer_types", None) or ()) | {"full_attention", "sliding_attention"}
    nested = {name: dict(value or {}) for name, value in params.items() if name in labels and isinstance(value, dict)}
    return nested or {None: dict(params)}


def rope_type_of(params: dict) -> str:
    return str(params.get("rope_type", params.get("type", "default")))


def context_length(hf_config: Any) -> int:
    """The longest sequence the model serves: max_position_embeddings, times the factor of a `dynamic` rope,
    which exists to stretch it (transformers rescales its frequencies past max_position_embeddings; vLLM scales the
    length alike)."""
    length = int(hf_config.max_position_embeddings)
    for params in rope_parameter_sets(hf_config).values():
        if rope_type_of(params) == "dynamic":
            length = max(length, int(length * float(params.get("factor", 1.0))))
    return length


def layer_sliding_windows(hf_config: Any, context_len: int) -> tuple[int | None, ...]:
    """Each layer's window in tokens, None where it attends to the whole context (or the window covers it)."""
    num_layers = int(hf_config.num_hidden_layers)
    window = getattr(hf_config, "sliding_window", None)
    if not window or int(window) >= context_len:
        return (None,) * num_layers
    layer_types = getattr(hf_config, "layer_types", None)
    if layer_types is not None:
        unknown = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
        if unknown:
            raise ValueError(f"unsupported attention layer types {unknown} in config.json's layer_types")
        return tuple(int(window) if kind == "sliding_attention" else None for kind in layer_types[:num_layers])
    if getattr(hf_config, "use_sliding_window", True) is False:
        return (None,) * num_layers
    return (int(window),) * num_layers


def kv_window(sliding_windows: tuple[int | None, ...]) -> int | None:
    """The window outside which no layer reads a key (the largest), when every layer has one; else None."""
    if not sliding_windows or any(window is None for window in sliding_windows):
        return None
    return max(sliding_windows)  # type: ignore[type-var]


@dataclass(frozen=True, slots=True)
class RopeLengthRule:
    """A rope whose frequencies depend on the sequence length: `longrope` (short factors up to `threshold` =
    original_max_position_embeddings, long ones past it) or `dynamic` (NTK base rescaled past `threshold` =
    max_position_embeddings)."""

    kind: str
    threshold: int
    restarts_past_threshold: bool = False
    """A sequence whose base length is within the threshold is recomputed once it grows past it (Phi-3)."""

    def cache_salt(self, base_len: int) -> int:
        """What, besides its tokens, decides a block's KV: tokens counted from a base length past the threshold rotate
        differently, so their blocks must not be shared with shorter ones' (0: the plain rotation)."""
        if base_len <= self.threshold:
            return 0
        return 1 if self.kind == "longrope" else base_len

    def needs_restart(self, base_len: int, num_tokens: int) -> bool:
        """Whether a sequence of `num_tokens` whose KV was rotated from `base_len` must be recomputed first."""
        return self.restarts_past_threshold and base_len <= self.threshold < num_tokens


def rope_length_rule(hf_config: Any) -> RopeLengthRule | None:
    """The rule of the model's length-dependent rope, if it has one (one per model: every layer type shares it)."""
    rules = set()
    for params in rope_parameter_sets(hf_config).values():
        kind = rope_type_of(params)
        if kind == "longrope":
            original = params.get("original_max_position_embeddings") or getattr(
                hf_config, "original_max_position_embeddings", None
            )
            # transformers' Phi3ForCausalLM recomputes its cache at the switch; Llama-style classes do not.
            restarts = getattr(hf_config, "model_type", None) == "phi3"
            rules.add(RopeLengthRule("longrope", int(original or hf_config.max_position_embeddings), restarts))
        elif kind == "dynamic":
            rules.add(RopeLengthRule("dynamic", int(hf_config.max_position_embeddings)))
    if len(rules) > 1:
        raise ValueError(f"layers with different length-dependent ropes are not supported: {sorted(rules)}")
    return rules.pop() if rules else None
