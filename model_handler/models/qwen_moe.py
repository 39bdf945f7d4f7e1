"""Qwen2-MoE and Qwen3-MoE: Qwen2's / Qwen3's attention and a sparse MoE MLP on the layers that
`decoder_sparse_step` and `mlp_only_layers` pick (the dense MLP elsewhere), top-k renormalised only with
`norm_topk_prob`. Qwen2-MoE adds a shared expert on every token, scaled by sigmoid(shared_expert_gate(x)).
Experts are stored as `mlp.experts.N.gate_proj/up_proj/down_proj`."""

from __future__ import annotations

from torch import nn
from transformers import PretrainedConfig

from model_handler.kernels import AttentionBackend
from model_handler.layers.moe import SparseMoeBlock, check_moe_activation, expert_checkpoint_names, num_experts_of
from model_handler.model_config import ModelConfig
from model_handler.models.llama import FamilySpec, LlamaForCausalLM, LlamaMLP, ParallelSpec


def is_sparse_layer(hf_config: PretrainedConfig, layer_idx: int) -> bool:
    """transformers' rule: a MoE block unless listed in mlp_only_layers, on every decoder_sparse_step-th layer."""
    step = getattr(hf_config, "decoder_sparse_step", 1)
    if step is None or step < 1:
        raise ValueError(f"decoder_sparse_step must be a positive integer, got {step!r}")
    dense_layers = getattr(hf_config, "mlp_only_layers", None) or []
    return layer_idx not in dense_layers and num_experts_of(hf_config) > 0 and (layer_idx + 1) % step == 0


class Qwen2MoeForCausalLM(LlamaForCausalLM):
    expert_modules_mapping = expert_checkpoint_names(gate="gate_proj", up="up_proj", down="down_proj")
    has_shared_expert = True

    @classmethod
    def family_spec(cls, hf_config: PretrainedConfig) -> FamilySpec:
        qkv_bias = bool(getattr(hf_config, "qkv_bias", True))  # a config field since transformers 5; always on before
        return FamilySpec(qkv_bias=qkv_bias, o_bias=False, mlp_bias=False, qk_norm=False)

    def make_mlp(
        self,
        hf_config: PretrainedConfig,
        config: ModelConfig,
        backend: AttentionBackend,
        tp: ParallelSpec,
        layer_idx: int,
    ) -> nn.Module | None:
        if not is_sparse_layer(hf_config, layer_idx):
            return None  # the dense MLP of hf_config.intermediate_size
        check_moe_activation(hf_config)
        shared = None
        if self.has_shared_expert:
            shared = LlamaMLP(
                config.hidden_size,
                hf_config.shared_expert_intermediate_size,
                False,
                tp,
                backend.fused,
                reduce_results=False,  # the block reduces it with the routed experts' sum
            )
        return SparseMoeBlock(
            config.hidden_size,
            num_experts_of(hf_config),
            hf_config.num_experts_per_tok,
            hf_config.moe_intermediate_size,
            renormalize=bool(getattr(hf_config, "norm_topk_prob", False)),
            use_triton=backend.name == "triton",
            shared_expert=shared,
            shared_expert_gate=shared is not None,
            **tp.kwargs,
        )


class Qwen3MoeForCausalLM(Qwen2MoeForCausalLM):
    """Qwen3's attention (per-head q/k RMSNorm); no shared expert."""

    has_shared_expert = False

    @classmethod
    def family_spec(cls, hf_config: PretrainedConfig) -> FamilySpec:
        attention_bias = bool(getattr(hf_config, "attention_bias", False))
        return FamilySpec(qkv_bias=attention_bias, o_bias=attention_bias, mlp_bias=False, qk_norm=True)
