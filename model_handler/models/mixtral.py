"""Mixtral: Mistral's attention with a sparse MoE MLP in every layer (softmax router, top-k renormalised,
SwiGLU experts stored as `block_sparse_moe.experts.N.w1/w3/w2` = gate/up/down)."""

from __future__ import annotations

from torch import nn
from transformers import PretrainedConfig

from model_handler.kernels import AttentionBackend
from model_handler.layers.moe import SparseMoeBlock, check_moe_activation, expert_checkpoint_names, num_experts_of
from model_handler.model_config import ModelConfig
from model_handler.models.llama import FamilySpec, LlamaForCausalLM, ParallelSpec


class MixtralForCausalLM(LlamaForCausalLM):
    """Its sliding window (None in Mixtral-8x7B/8x22B) is honoured as Mistral's is (model_config)."""

    checkpoint_renames = {"block_sparse_moe": "mlp"}  # transformers 5 names the block `mlp` too
    expert_modules_mapping = expert_checkpoint_names(gate="w1", up="w3", down="w2")

    @classmethod
    def family_spec(cls, hf_config: PretrainedConfig) -> FamilySpec:
        return FamilySpec(qkv_bias=False, o_bias=False, mlp_bias=False, qk_norm=False)

    def make_mlp(
        self,
        hf_config: PretrainedConfig,
        config: ModelConfig,
        backend: AttentionBackend,
        tp: ParallelSpec,
        layer_idx: int,
    ) -> nn.Module:
        check_moe_activation(hf_config)
        return SparseMoeBlock(
            config.hidden_size,
            num_experts_of(hf_config),
            hf_config.num_experts_per_tok,
            hf_config.intermediate_size,
            renormalize=True,
            use_triton=backend.name == "triton",
            **tp.kwargs,
        )
