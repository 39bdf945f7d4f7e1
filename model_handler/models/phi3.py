"""The Phi-3 family (Phi-3, Phi-3.5, Phi-4-mini: `Phi3ForCausalLM`): Llama's layers, with the checkpoint's q/k/v and
gate/up projections already fused (`qkv_proj`, `gate_up_proj`, split per rank by the merged linears' loaders),
`longrope` (short factors within original_max_position_embeddings, long past it: `layers/rope_scaling.py`), rotary
on part of each head (`partial_rotary_factor`, Phi-4-mini) and a sliding window on every layer where config.json
sets one (Phi-3-mini-4k) -- all read from the config by the shared Llama code.
"""

from __future__ import annotations

from transformers import PretrainedConfig

from model_handler.kernels import AttentionBackend
from model_handler.layers.activation import GatedActivation
from model_handler.model_config import ModelConfig
from model_handler.models.llama import LlamaForCausalLM


class Phi3ForCausalLM(LlamaForCausalLM):
    # The checkpoint's tensor names are our parameters' own: nothing to map (shard id None = a fused tensor).
    packed_modules_mapping: dict[str, tuple[str, object]] = {}

    def __init__(
        self,
        hf_config: PretrainedConfig,
        config: ModelConfig,
        attention_backend: AttentionBackend,
        *,
        tp_rank: int = 0,
        tp_size: int = 1,
    ) -> None:
        super().__init__(hf_config, config, attention_backend, tp_rank=tp_rank, tp_size=tp_size)
        activation = getattr(hf_config, "hidden_act", "silu")
        if activation != "silu":  # Phi3MLP: up * act(gate), whatever act the config names
            for layer in self.model.layers:
                layer.mlp.act_fn = GatedActivation(activation)
