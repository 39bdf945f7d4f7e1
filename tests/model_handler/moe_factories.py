"""Small random MoE checkpoints built with transformers' own config classes: Mixtral, Qwen2-MoE, Qwen3-MoE."""

from __future__ import annotations

from pathlib import Path

from transformers import MixtralConfig, PretrainedConfig, Qwen2MoeConfig, Qwen3MoeConfig

_COMMON = dict(
    vocab_size=96,
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
    num_experts_per_tok=2,
)


def moe_config(name: str, **overrides: object) -> PretrainedConfig:
    """A small config of one MoE family: few experts, top-2, every family-specific path switched on."""
    if name == "mixtral":
        return MixtralConfig(
            **{**_COMMON, "num_hidden_layers": 2, "intermediate_size": 48, "num_local_experts": 4, **overrides}
        )
    if name == "qwen2_moe":
        # A dense layer among the sparse ones (mlp_only_layers), the shared expert and its gate, top-k weights
        # left unnormalised (norm_topk_prob false, as Qwen1.5-MoE).
        return Qwen2MoeConfig(
            **{
                **_COMMON,
                "num_hidden_layers": 3,
                "intermediate_size": 80,
                "num_experts": 4,
                "moe_intermediate_size": 32,
                "shared_expert_intermediate_size": 48,
                "mlp_only_layers": [1],
                "norm_topk_prob": False,
                **overrides,
            }
        )
    if name == "qwen3_moe":
        # q/k norm, renormalised top-k, MoE on every second layer (decoder_sparse_step 2), head_dim given.
        return Qwen3MoeConfig(
            **{
                **_COMMON,
                "num_hidden_layers": 3,
                "intermediate_size": 80,
                "num_experts": 6,
                "moe_intermediate_size": 32,
                "head_dim": 16,
                "decoder_sparse_step": 2,
                "norm_topk_prob": True,
                **overrides,
            }
        )
    raise ValueError(f"unknown MoE family {name!r}")


MOE_FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe"]


SERVED_VOCAB = 512  # the tokenizer build_moe_model_dir trains


def build_moe_model_dir(family: str, out_dir: Path, **overrides: object) -> Path:
    """A folder the server can serve: the tiny model's trained tokenizer and chat template, with a random
    checkpoint of `family` (bos/eos/pad ids those of the tokenizer) in place of the tiny Llama's."""
    from model_handler.tiny_model import BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, SPECIAL_TOKENS, build_tiny_model
    from tests.model_handler.model_factories import save_random_model

    build_tiny_model(out_dir, vocab_size=SERVED_VOCAB, hidden_size=64, intermediate_size=64, num_layers=1, num_heads=4)
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        (out_dir / name).unlink()
    bos, eos, pad = (SPECIAL_TOKENS.index(token) for token in (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN))
    config = moe_config(
        family,
        **{
            "vocab_size": SERVED_VOCAB,
            "max_position_embeddings": 512,
            "bos_token_id": bos,
            "eos_token_id": eos,
            "pad_token_id": pad,
            **overrides,
        },
    )
    save_random_model(config, out_dir)
    return out_dir
