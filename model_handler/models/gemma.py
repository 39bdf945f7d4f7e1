"""The Gemma family over a flat batch and a paged KV cache: Gemma 2 (`Gemma2ForCausalLM`) and Gemma 3 text-only
(`Gemma3ForCausalLM`), on Llama's attention and MLP with Gemma's differences (transformers' modeling files are the
oracle):

- RMSNorm scales by (1 + w), in fp32, rounded once (`GemmaRMSNorm`); a norm after attention and around the MLP;
- embeddings times sqrt(hidden_size), that factor rounded to the model dtype;
- GeGLU (`hidden_activation`, gelu_pytorch_tanh); softmax scale query_pre_attn_scalar ** -0.5;
- sliding windows on the layers `layer_types` names (Gemma 2: every other layer; Gemma 3: five local per global);
- Gemma 2: attention logits soft-capped (attn_logit_softcapping) in the attention kernels, final logits too;
- Gemma 3: per-head q/k RMSNorm; local layers rotate with their own rope (rope_local_base_freq), global ones with
  rope_theta and its scaling.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from model_handler.kernels import AttentionBackend, FusedKernels
from model_handler.layers.activation import GatedActivation
from model_handler.layers.attention_metadata import AttentionMetadata
from model_handler.layers.embedding import VocabParallelEmbedding
from model_handler.layers.linear import copy_checked
from model_handler.layers.norm import RMSNorm
from model_handler.layers.rotary import RopeRows, build_rotary
from model_handler.model_config import ModelConfig
from model_handler.model_layout import rope_parameter_sets
from model_handler.models.llama import (
    DecoderForCausalLM,
    FamilySpec,
    KVCache,
    LlamaAttention,
    LlamaMLP,
    ParallelSpec,
)


class GemmaRMSNorm(RMSNorm):
    """x / rms(x) * (1 + w) in fp32, rounded to x's dtype once (transformers' Gemma2RMSNorm). The parameter holds
    1 + w in fp32, w first rounded to the model dtype as transformers' parameter would be."""

    def __init__(self, hidden_size: int, eps: float, fused: FusedKernels | None = None) -> None:
        super().__init__(hidden_size, eps, fused)  # `fused`: only kernels that read an fp32 weight as it is (Triton's)
        self.model_dtype = torch.get_default_dtype()
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=torch.float32), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: object = None) -> None:
        copy_checked(param.detach(), loaded_weight.to(self.model_dtype).float() + 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), self.normalized_shape, self.weight, self.eps).to(x.dtype)


class Gemma3Attention(LlamaAttention):
    """Llama's attention with Gemma's per-head q/k norms ((1 + w), in fp32)."""

    def __init__(self, hf_config: PretrainedConfig, config: ModelConfig, *args, **kwargs) -> None:
        super().__init__(hf_config, config, *args, **kwargs)
        self.q_norm = GemmaRMSNorm(config.head_dim, hf_config.rms_norm_eps)
        self.k_norm = GemmaRMSNorm(config.head_dim, hf_config.rms_norm_eps)

    def norm_qk(self, qk: torch.Tensor) -> torch.Tensor:
        weight = torch.cat(
            (self.q_norm.weight.expand(self.num_heads, -1), self.k_norm.weight.expand(self.num_kv_heads, -1))
        )  # [H + Hkv, D] fp32
        return (F.rms_norm(qk.float(), (self.head_dim,), None, self.q_norm.eps) * weight).to(qk.dtype)


class GemmaDecoderLayer(nn.Module):
    def __init__(
        self,
        hf_config: PretrainedConfig,
        config: ModelConfig,
        backend: AttentionBackend,
        tp: ParallelSpec,
        sliding_window: int | None,
        is_gemma3: bool,
    ) -> None:
        super().__init__()
        spec = FamilySpec(
            qkv_bias=hf_config.attention_bias, o_bias=hf_config.attention_bias, mlp_bias=False, qk_norm=is_gemma3
        )
        attention = Gemma3Attention if is_gemma3 else LlamaAttention
        # Gemma 3 keeps attn_logit_softcapping in its config but transformers never applies it.
        softcap = None if is_gemma3 else getattr(hf_config, "attn_logit_softcapping", None)
        self.self_attn = attention(
            hf_config,
            config,
            spec,
            backend,
            tp,
            sliding_window=sliding_window,
            scale=hf_config.query_pre_attn_scalar**-0.5,
            softcap=softcap,
        )
        self.mlp = LlamaMLP(
            config.hidden_size,
            hf_config.intermediate_size,
            False,
            tp,
            None,
            GatedActivation(hf_config.hidden_activation),
        )
        fused = backend.fused if backend.name == "triton" else None  # the CPU kernels round the weight to x's dtype
        eps = hf_config.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(config.hidden_size, eps, fused)
        self.post_attention_layernorm = GemmaRMSNorm(config.hidden_size, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, eps, fused)
        self.post_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, eps)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        rope: RopeRows,
        kv_cache: KVCache,
        attn_metadata: AttentionMetadata,
        output_rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, residual) as LlamaDecoderLayer's: the layer's output is their sum."""
        x, residual = self.input_layernorm.forward_with_residual(x, residual)
        x = self.post_attention_layernorm(self.self_attn(x, rope, kv_cache, attn_metadata, output_rows))
        if output_rows is not None:
            residual = residual[output_rows]
        x, residual = self.pre_feedforward_layernorm.forward_with_residual(x, residual)
        return self.post_feedforward_layernorm(self.mlp(x)), residual


class GemmaModel(nn.Module):
    def __init__(
        self, hf_config: PretrainedConfig, config: ModelConfig, backend: AttentionBackend, tp: ParallelSpec
    ) -> None:
        super().__init__()
        is_gemma3 = hf_config.model_type == "gemma3_text"
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, **tp.kwargs)
        dtype = torch.get_default_dtype()
        # transformers multiplies by sqrt(hidden_size) rounded to the weights' dtype (55.4256 -> 55.5 in bf16).
        self.register_buffer("normalizer", torch.tensor(config.hidden_size**0.5, dtype=dtype), persistent=False)
        # One rotary table per rope (Gemma 3: the local layers' and the global layers'), and which one each layer uses.
        rope_keys = list(rope_parameter_sets(hf_config))
        self.rotary_embs = nn.ModuleDict(
            {
                str(key): build_rotary(
                    hf_config, config.head_dim, config.max_position_embeddings, dtype, backend.fused, key
                )
                for key in rope_keys
            }
        )
        layer_types = getattr(hf_config, "layer_types", None) or ["full_attention"] * config.num_layers
        self.layer_rope = [str(kind if kind in rope_keys else None) for kind in layer_types[: config.num_layers]]
        windows = config.sliding_windows or (None,) * config.num_layers
        self.layers = nn.ModuleList(
            GemmaDecoderLayer(hf_config, config, backend, tp, windows[i], is_gemma3) for i in range(config.num_layers)
        )
        self.norm = GemmaRMSNorm(
            config.hidden_size, hf_config.rms_norm_eps, backend.fused if backend.name == "triton" else None
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[KVCache],
        attn_metadata: AttentionMetadata,
        output_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states [T, hidden], or [len(output_rows), hidden] (see LlamaModel.forward)."""
        x = self.embed_tokens(input_ids) * self.normalizer  # [T, hidden]
        ropes = {key: rotary.lookup(positions, attn_metadata.rope_lengths) for key, rotary in self.rotary_embs.items()}
        residual = None
        last = len(self.layers) - 1
        for i, (layer, kv_cache) in enumerate(zip(self.layers, kv_caches, strict=True)):
            rope = ropes[self.layer_rope[i]]
            x, residual = layer(x, residual, rope, kv_cache, attn_metadata, output_rows if i == last else None)
        x, _ = self.norm.forward_with_residual(x, residual)
        return x  # [T or N, hidden]


class Gemma2ForCausalLM(DecoderForCausalLM):
    def __init__(
        self,
        hf_config: PretrainedConfig,
        config: ModelConfig,
        attention_backend: AttentionBackend,
        *,
        tp_rank: int = 0,
        tp_size: int = 1,
    ) -> None:
        super().__init__()
        if getattr(hf_config, "use_bidirectional_attention", False):
            raise ValueError(
                f"{config.architecture} with use_bidirectional_attention (an embedding model) is not supported"
            )
        self.config = config
        tp = ParallelSpec(tp_rank, tp_size)
        self.model = GemmaModel(hf_config, config, attention_backend, tp)
        self._attach_lm_head(config, tp)
        self.final_logit_softcapping = getattr(hf_config, "final_logit_softcapping", None)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = super().compute_logits(hidden)  # [N, vocab] float32
        cap = self.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    """Gemma 3 text-only: the layers differ by their q/k norms and per-type ropes (GemmaModel reads the config)."""
