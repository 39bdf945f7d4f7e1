"""The Llama family over a flat batch and a paged KV cache: Llama 2/3, Mistral, Qwen2 (qkv bias) and
Qwen3 (per-head q/k RMSNorm), tied or untied embeddings, per-layer sliding windows, tensor-parallel ready.

Parameter names follow HF's except the fused `qkv_proj` and `gate_up_proj`; `packed_modules_mapping`
tells `weights.py` how the HF tensors fill them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from model_handler.kernels import AttentionBackend, FusedKernels
from model_handler.layers.activation import SiluAndMul
from model_handler.layers.attention import PagedAttention
from model_handler.layers.attention_metadata import AttentionMetadata
from model_handler.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from model_handler.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from model_handler.layers.norm import RMSNorm
from model_handler.layers.rotary import RopeRows, build_rotary
from model_handler.model_config import ModelConfig

KVCache = tuple[torch.Tensor, torch.Tensor]


@dataclass(slots=True)
class FamilySpec:
    """What differs between the family members' layers."""

    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool


@dataclass(slots=True)
class ParallelSpec:
    tp_rank: int = 0
    tp_size: int = 1

    @property
    def kwargs(self) -> dict[str, int]:
        return {"tp_rank": self.tp_rank, "tp_size": self.tp_size}


class LlamaAttention(nn.Module):
    def __init__(
        self,
        hf_config: PretrainedConfig,
        config: ModelConfig,
        spec: FamilySpec,
        backend: AttentionBackend,
        tp: ParallelSpec,
        sliding_window: int | None = None,
        scale: float | None = None,
        softcap: float | None = None,
    ) -> None:
        """`sliding_window`: this layer's window (None: the whole context); `scale`: the softmax scale (default
        head_dim ** -0.5); `softcap`: the attention-logit soft-cap (Gemma 2)."""
        super().__init__()
        self.head_dim = config.head_dim
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size, config.head_dim, config.num_heads, config.num_kv_heads, spec.qkv_bias, **tp.kwargs
        )
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.o_proj = RowParallelLinear(
            config.num_heads * config.head_dim, config.hidden_size, spec.o_bias, **tp.kwargs
        )
        self.qk_norm = spec.qk_norm
        if spec.qk_norm:
            self.q_norm = RMSNorm(config.head_dim, hf_config.rms_norm_eps)
            self.k_norm = RMSNorm(config.head_dim, hf_config.rms_norm_eps)
        self.attn = PagedAttention(
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            self.head_dim**-0.5 if scale is None else scale,
            backend,
            sliding_window,
            softcap,
        )

    def forward(
        self,
        x: torch.Tensor,
        rope: RopeRows,
        kv_cache: KVCache,
        attn_metadata: AttentionMetadata,
        output_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """[T, hidden], or [len(output_rows), hidden]: every token's k/v is stored, only those rows go on."""
        num_tokens = x.shape[0]
        num_qk_heads = self.num_heads + self.num_kv_heads
        qkv = self.qkv_proj(x).view(num_tokens, num_qk_heads + self.num_kv_heads, self.head_dim)  # [T, H+2Hkv, D]
        # q and k sit side by side in the fused output, so one norm and one rope call cover both.
        qk = qkv[:, :num_qk_heads]  # [T, H + Hkv, D]
        if self.qk_norm:
            qk = self.norm_qk(qk)
        qk = rope.apply(qk)  # [T, H + Hkv, D] (the fused kernel rotates qkv's q and k in place)
        q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]  # [T, H, D], [T, Hkv, D]
        v = qkv[:, num_qk_heads:]  # [T, Hkv, D]
        out = self.attn(q, k, v, kv_cache, attn_metadata)  # [T, H * D]
        if output_rows is not None:
            out = out[output_rows]  # [N, H * D]: rows are independent from here on
        return self.o_proj(out)

    def norm_qk(self, qk: torch.Tensor) -> torch.Tensor:
        """Per-head RMSNorm of q and k side by side: [T, H + Hkv, D] -> [T, H + Hkv, D]."""
        weight = torch.cat(
            (self.q_norm.weight.expand(self.num_heads, -1), self.k_norm.weight.expand(self.num_kv_heads, -1))
        )  # [H + Hkv, D]
        return F.rms_norm(qk, (self.head_dim,), None, self.q_norm.eps) * weight


class LlamaMLP(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        bias: bool,
        tp: ParallelSpec,
        fused: FusedKernels | None,
        act_fn: nn.Module | None = None,
        *,
        reduce_results: bool = True,  # False: each rank's partial sum (a MoE block's shared expert)
    ) -> None:
        """`act_fn`: the gated activation over [gate | up] (default SiLU; Gemma's GeGLU passes its own)."""
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            hidden_size, [intermediate_size, intermediate_size], bias, **tp.kwargs
        )
        self.down_proj = RowParallelLinear(
            intermediate_size, hidden_size, bias, reduce_results=reduce_results, **tp.kwargs
        )
        self.act_fn = SiluAndMul(fused) if act_fn is None else act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))  # [T, 2I/tp] -> [T, I/tp] -> [T, hidden]


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self,
        hf_config: PretrainedConfig,
        config: ModelConfig,
        spec: FamilySpec,
        backend: AttentionBackend,
        tp: ParallelSpec,
        mlp: nn.Module | None = None,  # the family's own (a sparse MoE block); None: the dense LlamaMLP
        sliding_window: int | None = None,
    ) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(hf_config, config, spec, backend, tp, sliding_window)
        if mlp is None:
            mlp = LlamaMLP(config.hidden_size, hf_config.intermediate_size, spec.mlp_bias, tp, backend.fused)
        self.mlp = mlp
        self.input_layernorm = RMSNorm(config.hidden_size, hf_config.rms_norm_eps, backend.fused)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, hf_config.rms_norm_eps, backend.fused)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        rope: RopeRows,
        kv_cache: KVCache,
        attn_metadata: AttentionMetadata,
        output_rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, residual) of every token, or of `output_rows` only (the last layer of a step, see LlamaModel)."""
        x, residual = self.input_layernorm.forward_with_residual(x, residual)
        x = self.self_attn(x, rope, kv_cache, attn_metadata, output_rows)
        if output_rows is not None:
            residual = residual[output_rows]
        x, residual = self.post_attention_layernorm.forward_with_residual(x, residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    def __init__(
        self,
        hf_config: PretrainedConfig,
        config: ModelConfig,
        spec: FamilySpec,
        backend: AttentionBackend,
        tp: ParallelSpec,
        make_mlp: Callable[[int], nn.Module | None] | None = None,  # layer index -> its MLP (None: dense)
    ) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, **tp.kwargs)
        self.rotary_emb = build_rotary(
            hf_config, config.head_dim, config.max_position_embeddings, torch.get_default_dtype(), backend.fused
        )
        windows = config.sliding_windows or (None,) * config.num_layers
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(hf_config, config, spec, backend, tp, make_mlp(i) if make_mlp else None, windows[i])
            for i in range(config.num_layers)
        )
        self.norm = RMSNorm(config.hidden_size, hf_config.rms_norm_eps, backend.fused)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[KVCache],
        attn_metadata: AttentionMetadata,
        output_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states [T, hidden], or [len(output_rows), hidden] for the rows in `output_rows`.

        Only rows whose logits are read need the last layer past its attention: in a prefill step that is
        one row per prompt, so its o_proj and MLP (most of a Llama layer's weights) run on a handful of rows
        instead of every prompt token (llama.cpp prunes its last layer the same way).
        """
        x = self.embed_tokens(input_ids)  # [T, hidden]
        rope = self.rotary_emb.lookup(positions, attn_metadata.rope_lengths)  # shared by all layers
        residual = None
        last = len(self.layers) - 1
        for i, (layer, kv_cache) in enumerate(zip(self.layers, kv_caches, strict=True)):
            x, residual = layer(x, residual, rope, kv_cache, attn_metadata, output_rows if i == last else None)
        x, _ = self.norm.forward_with_residual(x, residual)
        return x  # [T or N, hidden]


class DecoderForCausalLM(nn.Module):
    """A decoder stack (`self.model`, embedding first) under a vocab-parallel LM head: what every family shares
    around its layers. A subclass builds `self.model`, then calls `_attach_lm_head`."""

    # HF checkpoint module name -> (our fused module, shard id passed to its weight loader)
    packed_modules_mapping: dict[str, tuple[str, object]] = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }
    # checkpoint tensors with no parameter here (old checkpoints saved the rope buffer)
    ignored_weight_suffixes = ("rotary_emb.inv_freq",)
    model: nn.Module

    def _attach_lm_head(self, config: ModelConfig, tp: ParallelSpec) -> None:
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, **tp.kwargs)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.num_kv_heads_per_rank = self.model.layers[0].self_attn.num_kv_heads if config.num_layers else 0

    def forward(
        self,
        input_ids: torch.Tensor,  # [T] int64
        positions: torch.Tensor,  # [T] int64
        kv_caches: list[KVCache],
        attn_metadata: AttentionMetadata,
        output_rows: torch.Tensor | None = None,  # [N] int64, ascending; None = every row
    ) -> torch.Tensor:
        return self.model(input_ids, positions, kv_caches, attn_metadata, output_rows)  # [T or N, hidden]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head.compute_logits(hidden)  # [N, vocab] float32


class LlamaForCausalLM(DecoderForCausalLM):
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
        self.config = config
        tp = ParallelSpec(tp_rank, tp_size)
        make_mlp = partial(self.make_mlp, hf_config, config, attention_backend, tp)
        self.model = LlamaModel(hf_config, config, self.family_spec(hf_config), attention_backend, tp, make_mlp)
        self._attach_lm_head(config, tp)

    @classmethod
    def family_spec(cls, hf_config: PretrainedConfig) -> FamilySpec:
        attention_bias = bool(getattr(hf_config, "attention_bias", False))
        return FamilySpec(
            qkv_bias=attention_bias,
            o_bias=attention_bias,
            mlp_bias=bool(getattr(hf_config, "mlp_bias", False)),
            qk_norm=False,
        )

    def make_mlp(
        self,
        hf_config: PretrainedConfig,
        config: ModelConfig,
        backend: AttentionBackend,
        tp: ParallelSpec,
        layer_idx: int,
    ) -> nn.Module | None:
        """Layer `layer_idx`'s MLP; None gives the dense LlamaMLP. MoE families return their sparse block."""
        return None


class MistralForCausalLM(LlamaForCausalLM):
    """Llama layers without biases; v0.1's sliding window applies to every layer (model_config.sliding_windows)."""


class Qwen2ForCausalLM(LlamaForCausalLM):
    @classmethod
    def family_spec(cls, hf_config: PretrainedConfig) -> FamilySpec:
        return FamilySpec(qkv_bias=True, o_bias=False, mlp_bias=False, qk_norm=False)


class Qwen3ForCausalLM(LlamaForCausalLM):
    @classmethod
    def family_spec(cls, hf_config: PretrainedConfig) -> FamilySpec:
        attention_bias = bool(getattr(hf_config, "attention_bias", False))
        return FamilySpec(qkv_bias=attention_bias, o_bias=attention_bias, mlp_bias=False, qk_norm=True)
