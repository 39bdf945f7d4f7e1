"""The dense families beyond Llama's own (Gemma 2, Gemma 3 text, Phi-3 with longrope and partial rotary, Phi-3 and
Mistral v0.1 with a window on every layer, Qwen2's windowed layers, a dynamic rope) against transformers' forward fed
chunk by chunk over its own cache, as generate() feeds it (Phi-3's recompute at the long-rope switch is the
scheduler's: test_engine_model_families.py), over a paged cache; their config reading; what is refused and why."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import Gemma3Config, Gemma3TextConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm

from model_handler.kernels import TorchReferenceBackend, select_backend
from model_handler.layers.rope_scaling import DynamicNtkScaling, LongRopeScaling
from model_handler.model_config import ModelConfig
from model_handler.model_loader import load_model
from model_handler.models.gemma import GemmaRMSNorm
from tests.model_handler.model_factories import (
    DYNAMIC_MAX_POSITIONS,
    LONGROPE_ORIGINAL,
    WINDOW,
    WINDOWED_FAMILIES,
    HFIncremental,
    PagedBatches,
    make_kv_caches,
    save_random_model,
    windowed_family_config,
)

BLOCK_SIZE, NUM_BLOCKS = 4, 48


def load(model_dir, backend: str = "torch"):
    attention = TorchReferenceBackend() if backend == "torch" else select_backend(torch.device("cpu"), backend)
    return load_model(model_dir, dtype=torch.float32, device=torch.device("cpu"), attention_backend=attention)


def assert_matches_generate_path(model, hf_model, steps: list[list[list[int]]]) -> None:
    """Each step's logits against transformers fed the same chunks of each sequence over its own cache."""
    config = model.config
    caches = make_kv_caches(config.num_layers, NUM_BLOCKS, BLOCK_SIZE, model.num_kv_heads_per_rank, config.head_dim)
    batches = PagedBatches(BLOCK_SIZE, NUM_BLOCKS, seed=3)  # block ids handed out in shuffled order
    oracle = HFIncremental(hf_model)
    with torch.inference_mode():
        for new_tokens in steps:
            input_ids, positions, metadata = batches.step(new_tokens)
            logits = model.compute_logits(model(input_ids, positions, caches, metadata))
            expected = torch.cat([oracle.logits(i, tokens) for i, tokens in enumerate(new_tokens)])
            torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


def mixed_steps(vocab_size: int) -> list[list[list[int]]]:
    """Prompts of 5, 9, 1 and 14 tokens in one flat batch, then a 3-token chunk among decodes, then decodes: past
    the window (6), across longrope's switch (8) and past the dynamic rope's max_position_embeddings (12)."""
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, vocab_size, (n,), generator=generator).tolist() for n in (5, 9, 1, 14)]
    decodes = [[[10 * step + i] for i in range(4)] for step in range(1, 5)]
    return [prompts, [[3], [4, 5, 6], [7], [8]], *decodes]


@pytest.mark.parametrize("family", WINDOWED_FAMILIES)
def test_logits_match_transformers_generate_path(family, tmp_path):
    hf_model = save_random_model(windowed_family_config(family), tmp_path)
    model = load(tmp_path)
    assert type(model).__name__ == type(hf_model).__name__
    assert_matches_generate_path(model, hf_model, mixed_steps(model.config.vocab_size))


@pytest.mark.parametrize(
    ("family", "backend"),
    [("gemma2", "cpu"), ("gemma3", "cpu"), ("phi3_longrope", "cpu"), ("mistral_v01", "cpu"), ("gemma2", "triton")],
)
def test_the_cpu_and_triton_kernels_run_the_families_alike(family, backend, tmp_path):
    """The C++ kernels (windows, soft-capping in the decode and prefill kernels) and the Triton ones (interpreted
    here: the GPU's code) give transformers' logits too."""
    hf_model = save_random_model(windowed_family_config(family), tmp_path)
    model = load(tmp_path, backend)
    steps = mixed_steps(model.config.vocab_size)
    assert_matches_generate_path(model, hf_model, steps if backend != "triton" else steps[:3])


@pytest.mark.parametrize("family", ["phi3_longrope", "llama_dynamic"])
def test_a_long_prompt_in_chunks_rotates_as_in_one_forward(family, tmp_path):
    """A prompt past the switch length, computed in chunks (chunked prefill, or a recompute after preemption): every
    chunk rotates with the prompt's length, as transformers' one forward over the prompt does; then decodes."""
    hf_model = save_random_model(windowed_family_config(family), tmp_path)
    model = load(tmp_path)
    config = model.config
    prompt = torch.randint(0, config.vocab_size, (20,), generator=torch.Generator().manual_seed(4)).tolist()
    caches = make_kv_caches(config.num_layers, NUM_BLOCKS, BLOCK_SIZE, model.num_kv_heads_per_rank, config.head_dim)
    batches = PagedBatches(BLOCK_SIZE, NUM_BLOCKS, prompt_lens=[len(prompt)])
    oracle = HFIncremental(hf_model)
    expected_prompt = oracle.logits(0, prompt)  # [20, vocab]
    with torch.inference_mode():
        got = []
        for chunk in (prompt[:7], prompt[7:13], prompt[13:]):
            input_ids, positions, metadata = batches.step([chunk])
            got.append(model.compute_logits(model(input_ids, positions, caches, metadata)))
        torch.testing.assert_close(torch.cat(got), expected_prompt, atol=1e-4, rtol=1e-4)
        for token in (5, 6, 7):
            input_ids, positions, metadata = batches.step([[token]])
            logits = model.compute_logits(model(input_ids, positions, caches, metadata))
            torch.testing.assert_close(logits, oracle.logits(0, [token]), atol=1e-4, rtol=1e-4)


def test_longrope_tables_hold_transformers_short_and_long_frequencies():
    config = windowed_family_config("phi3_longrope")
    scaling = LongRopeScaling(config, 16, None, LONGROPE_ORIGINAL)
    short, factor = ROPE_INIT_FUNCTIONS["longrope"](config, torch.device("cpu"))
    long, _ = ROPE_INIT_FUNCTIONS["longrope"](config, torch.device("cpu"), seq_len=LONGROPE_ORIGINAL + 1)
    torch.testing.assert_close(scaling.short_inv_freq, short, atol=0, rtol=0)
    torch.testing.assert_close(scaling.long_inv_freq, long, atol=0, rtol=0)
    assert scaling.attention_scaling == factor > 1  # factor 256 / 8: sqrt(1 + ln 32 / ln 8)
    table = scaling.table(32)
    assert table.shape == (32 + LONGROPE_ORIGINAL, 2, 12)  # partial rotary: 12 of 16 dims
    positions = torch.tensor([0, 7, 8, 20, 3])
    lengths = torch.tensor([5, 8, 9, 21, 9])  # a short prompt, its last short row, decodes past 8, a long prompt
    assert scaling.table_index(positions, lengths).tolist() == [0, 7, 8, 20, 32 + 3]


def test_dynamic_frequencies_are_transformers_at_every_length():
    config = windowed_family_config("llama_dynamic")
    scaling = DynamicNtkScaling(config, 16, None, DYNAMIC_MAX_POSITIONS)
    lengths = torch.tensor([1, DYNAMIC_MAX_POSITIONS, DYNAMIC_MAX_POSITIONS + 1, 30, 48])
    ours = scaling.inv_freq_for(lengths)
    for row, length in zip(ours, lengths.tolist()):
        expected, _ = ROPE_INIT_FUNCTIONS["dynamic"](config, torch.device("cpu"), seq_len=torch.tensor(length))
        torch.testing.assert_close(row, expected, atol=0, rtol=1e-6)
    assert not torch.allclose(ours[2], ours[1]) and not torch.allclose(ours[4], ours[3])  # rescaled past 12


def test_gemma_norm_is_transformers_in_bfloat16():
    """(1 + w) in fp32 over the fp32 normalisation, rounded once; w first held in the model dtype."""
    torch.manual_seed(0)
    reference = Gemma2RMSNorm(64, eps=1e-6).to(torch.bfloat16)
    with torch.no_grad():
        reference.weight.normal_(0, 0.5)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        ours = GemmaRMSNorm(64, 1e-6)
    finally:
        torch.set_default_dtype(previous)
    ours.weight.weight_loader(ours.weight, reference.weight.detach().float())  # an fp32 checkpoint
    x = torch.randn(5, 64).to(torch.bfloat16) * 3
    assert torch.equal(ours(x), reference(x))


@pytest.mark.parametrize(
    ("family", "windows", "kv_window", "context"),
    [
        ("mistral_v01", (WINDOW,) * 3, WINDOW, 256),
        ("qwen2_window", (None, WINDOW, WINDOW), None, 256),
        ("gemma2", (WINDOW, None, WINDOW), None, 256),
        ("gemma3", (WINDOW, WINDOW, None), None, 256),
        ("phi3_window", (WINDOW,) * 3, WINDOW, 256),
        ("phi3_longrope", (None,) * 3, None, 256),
        ("llama_dynamic", (None,) * 3, None, 4 * DYNAMIC_MAX_POSITIONS),
    ],
)
def test_model_config_reads_windows_and_the_context(family, windows, kv_window, context, tmp_path):
    """Each layer's window (transformers' layer_types, else every layer); blocks are freed only when every layer
    slides; the context is the model's own (a dynamic rope's stretched by its factor), never the window."""
    windowed_family_config(family).save_pretrained(tmp_path)
    config = ModelConfig.from_model_dir(tmp_path)
    assert (config.sliding_windows, config.kv_window, config.max_position_embeddings) == (windows, kv_window, context)


def test_a_window_as_long_as_the_context_is_no_window(tmp_path):
    config = windowed_family_config("mistral_v01")
    config.sliding_window = config.max_position_embeddings  # Phi-3-128k's 262144 on 131072 positions, in small
    config.save_pretrained(tmp_path)
    assert ModelConfig.from_model_dir(tmp_path).sliding_windows == (None,) * 3


def _write_config(tmp_path, config: dict) -> None:
    (tmp_path / "config.json").write_text(json.dumps(config))


def test_multimodal_gemma3_is_refused_naming_it(tmp_path):
    Gemma3Config(text_config=Gemma3TextConfig(num_hidden_layers=1).to_dict()).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="Gemma3ForConditionalGeneration is refused: multimodal Gemma 3"):
        ModelConfig.from_model_dir(tmp_path)


@pytest.mark.parametrize("architecture", ["Phi4MMForCausalLM", "Phi4MultimodalForCausalLM"])
def test_phi4_multimodal_is_refused_naming_it_before_transformers_reads_it(tmp_path, architecture):
    # Phi-4-multimodal-instruct's config.json names model_type phi4mm, which transformers cannot even read.
    _write_config(tmp_path, {"architectures": [architecture], "model_type": "phi4mm", "hidden_size": 3072})
    with pytest.raises(ValueError, match=f"{architecture} is refused: Phi-4-multimodal is not supported"):
        ModelConfig.from_model_dir(tmp_path)


@pytest.mark.parametrize("method", ["awq", "gptq", "fp8", "bitsandbytes"])
def test_quantized_checkpoints_are_refused_naming_the_quantization(tmp_path, method):
    config = windowed_family_config("gemma2").to_dict()
    config["quantization_config"] = {"quant_method": method, "bits": 4}
    _write_config(tmp_path, config)
    with pytest.raises(ValueError, match=f"quantized checkpoint .*quant_method '{method}'"):
        ModelConfig.from_model_dir(tmp_path)
