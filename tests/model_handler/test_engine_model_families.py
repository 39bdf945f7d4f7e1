"""The engine on the dense families beyond Llama's own: greedy tokens equal transformers' generate() through chunked
prefill, prefix-cache hits and preemption, with windows shorter than the sequences; a sequence longer than the whole
KV cache runs when every layer slides (blocks outside the window are freed); two gloo ranks equal one."""

from __future__ import annotations

import pytest

from tests.model_handler.engine_factories import create_engine, greedy, hf_greedy, run_to_completion, tokens_of
from tests.model_handler.model_factories import (
    DYNAMIC_MAX_POSITIONS,
    LONGROPE_ORIGINAL,
    WINDOW,
    WINDOWED_FAMILIES,
    save_random_model,
    windowed_family_config,
)

CHUNKED = {"MAX_BATCH_PREFILL_TOKENS": "8", "MAX_BATCH_SIZE": "8"}  # prompts over several steps, among decodes


@pytest.fixture(scope="module")
def family_models(tmp_path_factory) -> dict[str, tuple]:
    """family -> (model folder, transformers' model of it in fp32)."""
    models = {}
    for family in WINDOWED_FAMILIES:
        folder = tmp_path_factory.mktemp(family)
        models[family] = (folder, save_random_model(windowed_family_config(family), folder))
    return models


def expected_greedy(family_models, family: str, prompt: list[int], num_tokens: int) -> list[int]:
    """transformers' generate(); for the dynamic rope on a freshly loaded model, as its rope keeps state across
    calls (a sequence shorter than the one before keeps that one's frequencies, unless within the original length)."""
    folder, hf_model = family_models[family]
    if family == "llama_dynamic":
        import torch
        from transformers import AutoModelForCausalLM

        hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return hf_greedy(hf_model, prompt, num_tokens)


def prompt_of(length: int, seed: int) -> list[int]:
    import random

    rng = random.Random(seed)
    return [rng.randrange(3, 96) for _ in range(length)]


def generate(engine, requests) -> dict[str, list[int]]:
    for request in requests:
        engine.add_request(request)
    outputs = {rid: tokens_of(outs) for rid, outs in run_to_completion(engine).items()}
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks, "KV blocks leaked"
    return outputs


@pytest.mark.parametrize("family", WINDOWED_FAMILIES)
def test_greedy_tokens_match_generate_with_chunks_and_a_prefix_hit(family, family_models):
    """Prompts shorter and longer than the window, longrope's switch (8) and the dynamic rope's 12, computed in
    8-token chunks beside decodes; then the longest prompt again, from the prefix cache."""
    folder, _ = family_models[family]
    engine = create_engine(folder, **CHUNKED)
    prompts = {"short": prompt_of(5, 1), "long": prompt_of(30, 2), "mid": prompt_of(11, 3)}
    outputs = generate(engine, [greedy(rid, prompt, 16) for rid, prompt in prompts.items()])
    for rid, prompt in prompts.items():
        assert outputs[rid] == expected_greedy(family_models, family, prompt, 16), rid
    engine.add_request(greedy("again", prompts["long"], 16))
    again = run_to_completion(engine)["again"]
    assert tokens_of(again) == outputs["long"]
    assert again[-1].num_cached_tokens >= 16, "the repeated prompt was computed again instead of read from the cache"


def test_a_longrope_prompt_past_the_switch_does_not_reuse_blocks_computed_before_it(family_models):
    """A short sequence's blocks hold its tokens rotated with the short factors; the same tokens at the start of a
    prompt past original_max_position_embeddings rotate with the long ones: no prefix hit may join them."""
    folder, hf_model = family_models["phi3_longrope"]
    engine = create_engine(folder, **CHUNKED)
    short = prompt_of(LONGROPE_ORIGINAL - 1, 4)
    first = generate(engine, [greedy("short", short, 2)])["short"]  # 9 tokens: block 0 (8) computed and cached
    longer = short + first + prompt_of(6, 5)  # 15 tokens, past the switch
    engine.add_request(greedy("longer", longer, 8))
    outputs = run_to_completion(engine)["longer"]
    assert tokens_of(outputs) == hf_greedy(hf_model, longer, 8)
    assert outputs[-1].num_cached_tokens == 0


def test_a_phi3_sequence_passing_the_switch_is_recomputed_with_the_long_factors(family_models):
    """transformers' Phi-3 drops its cache the first time a sequence passes original_max_position_embeddings and
    recomputes it with the long factors; the scheduler restarts the sequence alike (not a preemption)."""
    folder, hf_model = family_models["phi3_longrope"]
    engine = create_engine(folder, **CHUNKED)
    prompts = [prompt_of(5, 30 + i) for i in range(3)]
    outputs = generate(engine, [greedy(f"r{i}", prompt, 12) for i, prompt in enumerate(prompts)])
    for i, prompt in enumerate(prompts):
        assert outputs[f"r{i}"] == hf_greedy(hf_model, prompt, 12), i
    assert engine.scheduler.num_preemptions == 0


@pytest.mark.parametrize("family", ["mistral_v01", "phi3_window"])
def test_a_sequence_longer_than_the_cache_runs_when_every_layer_slides(family, family_models):
    """A cache of 10 blocks of 8 tokens (80) serves 140-token sequences, six at once with preemptions: each holds
    only the blocks its window and its next chunk reach, the rest go back to the pool as it advances."""
    folder, hf_model = family_models[family]
    engine = create_engine(folder, KV_CACHE_CPU_BYTES=str(10 * 6144), **CHUNKED)  # 6144 bytes a block here
    assert engine.block_manager.num_blocks == 10 and engine.model_config.kv_window == WINDOW
    prompts = [prompt_of(60, 10 + i) for i in range(6)]
    for i, prompt in enumerate(prompts):
        engine.add_request(greedy(f"r{i}", prompt, 80))
    held_at_most = 0
    outputs: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            outputs.setdefault(out.request_id, []).extend(out.new_token_ids)
        for seq in engine.scheduler.running:
            held_at_most = max(held_at_most, sum(block >= 0 for block in seq.block_table))
    assert held_at_most <= 3  # window 6 + a chunk of 8 span at most 3 blocks of 8
    assert engine.scheduler.num_preemptions > 0
    for i, prompt in enumerate(prompts):
        assert outputs[f"r{i}"] == hf_greedy(hf_model, prompt, 80), i
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_the_dynamic_rope_serves_past_max_position_embeddings(family_models):
    folder, _ = family_models["llama_dynamic"]
    engine = create_engine(folder, **CHUNKED)
    assert engine.context.max_model_len == 4 * DYNAMIC_MAX_POSITIONS
    prompts = [prompt_of(20, 7), prompt_of(4, 8)]  # past 12 from the start; crossing it while decoding
    outputs = generate(engine, [greedy(f"r{i}", prompt, 24) for i, prompt in enumerate(prompts)])
    for i, prompt in enumerate(prompts):
        assert outputs[f"r{i}"] == expected_greedy(family_models, "llama_dynamic", prompt, 24), i


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "phi3_longrope"])
def test_two_ranks_match_one(family, family_models):
    """SM_NUM_GPUS=2 on gloo: heads, the fused Phi-3 tensors and the vocabulary split over two ranks, the Gemma norms
    and rope tables replicated; greedy tokens as the single rank's, chunked prompts and a prefix hit included."""
    folder, _ = family_models[family]

    def requests():
        return [
            greedy("a", prompt_of(30, 20), 12),
            greedy("b", prompt_of(6, 21), 12),
            greedy("c", prompt_of(24, 20), 12),
        ]

    single = generate(create_engine(folder, **CHUNKED), requests())
    engine = create_engine(folder, SM_NUM_GPUS="2", **CHUNKED)
    try:
        assert engine.info().tensor_parallel_size == 2
        assert generate(engine, requests()) == single
    finally:
        engine.model_runner.shutdown()
