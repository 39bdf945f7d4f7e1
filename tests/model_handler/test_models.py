"""Our Llama-family model against transformers' own forward: same logits over a paged cache, per family."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from transformers import LlamaConfig, MistralConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from model_handler.kernels import TorchReferenceBackend, select_backend
from model_handler.layers.rotary import rope_inv_freq
from model_handler.model_config import ModelConfig
from model_handler.model_loader import load_model
from model_handler.models import get_model_class, resolve_architecture, supported_architectures
from tests.model_handler.model_factories import (
    FAMILIES,
    PagedBatches,
    family_config,
    hf_logits,
    make_kv_caches,
    save_random_model,
)

BLOCK_SIZE, NUM_BLOCKS = 4, 40


def load_fp32(model_dir):
    return load_model(
        model_dir, dtype=torch.float32, device=torch.device("cpu"), attention_backend=TorchReferenceBackend()
    )


def assert_matches_hf_over_paged_steps(model, hf_model, num_steps: int = 4) -> None:
    config = model.config
    caches = make_kv_caches(config.num_layers, NUM_BLOCKS, BLOCK_SIZE, model.num_kv_heads_per_rank, config.head_dim)
    batches = PagedBatches(BLOCK_SIZE, NUM_BLOCKS, seed=3)  # block ids handed out in shuffled order
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, config.vocab_size, (n,), generator=generator).tolist() for n in (5, 9, 1, 14)]
    steps = [
        prompts,  # a prefill of four sequences of different lengths in one flat batch
        [[3], [4, 5, 6], [7], [8]],  # decodes mixed with a 3-token chunk
        [[9], [10], [11], [12]],  # decodes crossing block boundaries
        [[13], [14], [15], [16]],
    ]
    with torch.inference_mode():
        for new_tokens in steps[:num_steps]:
            input_ids, positions, metadata = batches.step(new_tokens)
            hidden = model(input_ids, positions, caches, metadata)
            assert hidden.shape == (len(input_ids), config.hidden_size)
            logits = model.compute_logits(hidden)
            expected = torch.cat(
                [hf_logits(hf_model, batches.seq_tokens[i])[-len(tokens) :] for i, tokens in enumerate(new_tokens)]
            )
            assert logits.dtype == torch.float32
            torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers_over_paged_steps(family, tmp_path):
    hf_model = save_random_model(family_config(family), tmp_path)
    assert_matches_hf_over_paged_steps(load_fp32(tmp_path), hf_model)


@pytest.mark.parametrize(
    ("family", "backend"),
    [("llama_gqa", "torch"), ("qwen3", "torch"), ("llama_gqa", "cpu"), ("qwen3", "cpu"), ("llama_gqa", "triton")],
)
def test_output_rows_return_those_rows_and_still_fill_the_cache(family, backend, tmp_path):
    """With `output_rows` the forward returns only those rows' hidden states (the last layer past its
    attention runs on them alone), every token's k/v still lands in the cache: the next steps, which attend
    over it, keep matching transformers. The Triton backend (interpreted here) runs the GPU's kernels, its
    fused residual-add + RMSNorm included, on the pruned rows."""
    hf_model = save_random_model(family_config(family), tmp_path)
    model = load_model(
        tmp_path,
        dtype=torch.float32,
        device=torch.device("cpu"),
        attention_backend=select_backend(torch.device("cpu"), backend),
    )
    config = model.config
    caches = make_kv_caches(config.num_layers, NUM_BLOCKS, BLOCK_SIZE, model.num_kv_heads_per_rank, config.head_dim)
    batches = PagedBatches(BLOCK_SIZE, NUM_BLOCKS, seed=5)
    generator = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, config.vocab_size, (n,), generator=generator).tolist() for n in (7, 12, 3)]
    mlp_rows: list[int] = []
    hook = model.model.layers[-1].mlp.register_forward_pre_hook(lambda m, args: mlp_rows.append(args[0].shape[0]))
    try:
        with torch.inference_mode():
            for new_tokens in (prompts, [[1], [2, 3, 4, 5], [6]], [[7], [8], [9]]):
                input_ids, positions, metadata = batches.step(new_tokens)
                last_rows = torch.tensor(list(itertools.accumulate(len(t) for t in new_tokens))) - 1
                hidden = model(input_ids, positions, caches, metadata, output_rows=last_rows)
                assert hidden.shape == (len(new_tokens), config.hidden_size)
                expected = torch.stack([hf_logits(hf_model, batches.seq_tokens[i])[-1] for i in range(3)])
                torch.testing.assert_close(model.compute_logits(hidden), expected, atol=1e-4, rtol=1e-4)
    finally:
        hook.remove()
    assert mlp_rows == [3, 3, 3]  # 22, 6 and 3 tokens in, one row per sequence through the last MLP


def test_triton_backend_takes_the_strided_q_k_v_views(tmp_path):
    """q, k and v are views into the fused projection; the Triton kernels (interpreted on CPU) accept them."""
    hf_model = save_random_model(family_config("qwen3"), tmp_path)
    backend = select_backend(torch.device("cpu"), "triton")
    model = load_model(tmp_path, dtype=torch.float32, device=torch.device("cpu"), attention_backend=backend)
    assert_matches_hf_over_paged_steps(model, hf_model, num_steps=2)  # the interpreter is slow: prefill + mixed


def test_llama3_rope_frequencies_are_hf_scaled_ones():
    config = family_config("llama3_rope")
    inv_freq, scaling = rope_inv_freq(config, config.head_dim)
    hf_rotary = LlamaRotaryEmbedding(config)
    torch.testing.assert_close(inv_freq, hf_rotary.inv_freq, atol=0, rtol=0)
    default, _ = rope_inv_freq(family_config("llama_gqa"), config.head_dim)
    assert not torch.allclose(inv_freq, default)  # the scaling really changed something
    assert scaling == hf_rotary.attention_scaling


def test_model_config_reads_the_essentials(tmp_path):
    save_random_model(family_config("mistral"), tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7, 2], "bos_token_id": 1}))
    config = ModelConfig.from_model_dir(tmp_path)
    assert config.architecture == "MistralForCausalLM"
    assert config.model_type == "mistral"
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (4, 2, 24)  # head_dim from config.json
    assert config.eos_token_ids == [2, 7]
    assert config.bos_token_id == 1
    assert config.tie_word_embeddings is False
    assert config.torch_dtype == "float32"
    assert config.max_position_embeddings == 256


def test_a_sliding_window_no_longer_caps_the_context(tmp_path):
    """Mistral v0.1: the window applies per layer; the context stays the model's own."""
    config = MistralConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        sliding_window=128,
    )
    config.save_pretrained(tmp_path)
    model_config = ModelConfig.from_model_dir(tmp_path)
    assert model_config.max_position_embeddings == 512
    assert model_config.sliding_windows == (128,) and model_config.kv_window == 128


def test_config_without_architectures_falls_back_on_model_type(tmp_path):
    LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2
    ).save_pretrained(tmp_path)
    assert ModelConfig.from_model_dir(tmp_path).architecture == "LlamaForCausalLM"


def test_unsupported_architecture_lists_the_supported_ones():
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*supported: .*LlamaForCausalLM"):
        resolve_architecture(["GPT2LMHeadModel"], "gpt2")
    with pytest.raises(ValueError, match="Qwen3ForCausalLM"):
        get_model_class("FalconForCausalLM")
    dense = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"}
    dense |= {"Gemma2ForCausalLM", "Gemma3ForCausalLM", "Phi3ForCausalLM"}
    assert dense <= set(supported_architectures())


def test_tiny_model_loads_in_bfloat16_and_agrees_with_fp32(tiny_model_dir):
    reference = load_fp32(tiny_model_dir)
    model = load_model(
        tiny_model_dir, dtype=torch.bfloat16, device=torch.device("cpu"), attention_backend=TorchReferenceBackend()
    )
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.get_default_dtype() == torch.float32  # the loader restores the default
    assert model.num_kv_heads_per_rank == model.config.num_kv_heads
    results = []
    for m, dtype in ((reference, torch.float32), (model, torch.bfloat16)):
        caches = make_kv_caches(m.config.num_layers, 8, 16, m.num_kv_heads_per_rank, m.config.head_dim, dtype)
        input_ids, positions, metadata = PagedBatches(16, 8).step([list(range(10, 40))])
        with torch.inference_mode():
            results.append(m.compute_logits(m(input_ids, positions, caches, metadata)))
    assert results[1].dtype == torch.float32
    # bf16 keeps ~3 significant digits: compare relative to the logits' own spread, and the argmax exactly.
    bf16, fp32 = results[1], results[0]
    assert (bf16 - fp32).abs().max() < 0.25 * fp32.std()
    assert (bf16.argmax(-1) == fp32.argmax(-1)).float().mean() >= 0.9
