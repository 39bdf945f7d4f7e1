"""The MoE families in the engine: greedy tokens equal transformers' generate() through chunked prefill, a
mixed batch and prefix-cache hits, and SM_NUM_GPUS=2 (gloo) gives the single rank's tokens."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.model_handler.engine_factories import (
    create_engine,
    greedy,
    hf_greedy,
    random_prompt,
    run_to_completion,
    tokens_of,
)
from tests.model_handler.moe_factories import MOE_FAMILIES, build_moe_model_dir
from tests.model_handler.test_engine import count_replays

# A small step budget, so the longer prompts are prefilled in chunks over several steps.
ENV = {"MAX_BATCH_PREFILL_TOKENS": "32", "MAX_BATCH_SIZE": "8"}
N = 10
SHARED = random_prompt(40, seed=300)  # five full blocks of KV_CACHE_BLOCK_SIZE 8
PROMPTS = {
    "short": random_prompt(7, seed=1),
    "chunked": random_prompt(50, seed=2),  # prefilled over two steps
    "prefix-a": SHARED + random_prompt(5, seed=3),
    "late-long": random_prompt(70, seed=4),  # three steps, beside the others' decodes
    "prefix-b": SHARED + random_prompt(9, seed=5),
}


@pytest.fixture(scope="module", params=MOE_FAMILIES)
def moe_model_dir(request, tmp_path_factory):
    return build_moe_model_dir(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def moe_hf_model(moe_model_dir):
    return AutoModelForCausalLM.from_pretrained(moe_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def single_engine(moe_model_dir):
    return create_engine(moe_model_dir, **ENV)


@pytest.fixture(scope="module")
def tp_engine(moe_model_dir):
    engine = create_engine(moe_model_dir, SM_NUM_GPUS="2", **ENV)
    yield engine
    engine.model_runner.shutdown()


def run_mixed(engine) -> tuple[dict[str, list[int]], dict[str, int]]:
    """Three prompts start together; a long one arrives while they decode, and one sharing the 40-token prefix
    of an earlier one. Every request's tokens, and its prompt tokens that came from the prefix cache."""
    for rid in ("short", "chunked", "prefix-a"):
        engine.add_request(greedy(rid, PROMPTS[rid], N))
    outputs: dict[str, list] = {}
    for _ in range(3):  # the first ones are decoding when the next arrive
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
    for rid in ("late-long", "prefix-b"):
        engine.add_request(greedy(rid, PROMPTS[rid], N))
    for rid, outs in run_to_completion(engine).items():
        outputs.setdefault(rid, []).extend(outs)
    cached = {rid: outs[0].num_cached_tokens for rid, outs in outputs.items()}
    return {rid: tokens_of(outs) for rid, outs in outputs.items()}, cached


def test_greedy_tokens_match_generate(single_engine, moe_hf_model):
    tokens, cached = run_mixed(single_engine)
    assert cached["prefix-b"] == 40 and cached["short"] == 0  # the shared prefix came from the cache
    for rid, prompt in PROMPTS.items():
        assert tokens[rid] == hf_greedy(moe_hf_model, prompt, N), rid
    assert len(set(tokens["late-long"])) > 1  # the random model says something, not one token repeated


def test_two_ranks_give_the_single_rank_tokens(tp_engine, single_engine):
    assert tp_engine.info().tensor_parallel_size == 2
    assert run_mixed(tp_engine)[0] == run_mixed(single_engine)[0]


@pytest.mark.gpu
@pytest.mark.parametrize("moe_model_dir", ["qwen2_moe"], indirect=True)  # routed + shared experts, a dense layer
def test_cuda_graph_decode_through_the_fused_moe_matches_generate(moe_model_dir, moe_hf_model):
    """On a GPU the experts run in the fused Triton kernel, captured in the decode graphs: the same tokens as
    eager decoding and as transformers (fp32), with chunked prefill and a prefix-cache hit on the way."""
    import gc

    results = {}
    for graphs in ("1,2,4,8", "0"):
        engine = create_engine(moe_model_dir, device="cuda", CUDA_MEMORY_FRACTION="0.2", CUDA_GRAPHS=graphs, **ENV)
        assert engine.info().attention_backend == "triton" and engine.info().cuda_graphs == (graphs != "0")
        replays: list[int] = []
        if engine.model_runner.graph_runner is not None:
            count_replays(engine.model_runner.graph_runner, replays)
        results[graphs], cached = run_mixed(engine)
        assert cached["prefix-b"] == 40
        assert (len(replays) > 0) == (graphs != "0")
        del engine
        gc.collect()
        torch.cuda.empty_cache()
    assert results["1,2,4,8"] == results["0"]
    for rid, prompt in PROMPTS.items():
        assert results["0"][rid] == hf_greedy(moe_hf_model, prompt, N), rid
