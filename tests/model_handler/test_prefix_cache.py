"""Prefix caching on the real engine: shared prefixes are computed once and change no output token."""

from __future__ import annotations

import pytest

from tests.model_handler.engine_factories import (
    create_engine,
    greedy,
    hf_greedy,
    random_prompt,
    run_to_completion,
    tokens_of,
)

N = 8
BS = 8  # KV_CACHE_BLOCK_SIZE of create_engine


MODES = {"sync": "0", "async": "1"}  # async scheduling keys generated blocks only once their tokens are read


@pytest.fixture(scope="module", params=MODES)
def engine(test_model_dir, request):
    return create_engine(test_model_dir, ASYNC_SCHEDULING=MODES[request.param])


@pytest.fixture(scope="module")
def no_prefix_engine(test_model_dir):
    return create_engine(test_model_dir, PREFIX_CACHING="false")


@pytest.fixture(scope="module", params=MODES)
def small_cache_engine(test_model_dir, request):
    return create_engine(test_model_dir, KV_CACHE_CPU_BYTES="96KiB", ASYNC_SCHEDULING=MODES[request.param])


@pytest.fixture
def computed(engine):
    """Spy on the real model runner: tokens computed per request over the test."""
    counts: dict[str, int] = {}
    execute = engine.model_runner.execute

    def counting_execute(out, *patch):
        for entry in out.scheduled:
            counts[entry.seq.request_id] = counts.get(entry.seq.request_id, 0) + entry.num_new_tokens
        return execute(out, *patch)

    engine.model_runner.execute = counting_execute
    yield counts
    engine.model_runner.execute = execute


SYSTEM = random_prompt(43, seed=100)  # 5 full blocks + 3 tokens


def test_second_request_computes_only_its_new_tokens(engine, no_prefix_engine, computed, hf_model):
    first = SYSTEM + random_prompt(6, seed=1)
    second = SYSTEM + random_prompt(9, seed=2)
    engine.add_request(greedy("first", first, N))
    out_first = run_to_completion(engine)["first"]
    assert all(o.num_cached_tokens == 0 for o in out_first)
    engine.add_request(greedy("second", second, N))
    out_second = run_to_completion(engine)["second"]
    # The 5 full blocks of the shared prefix (40 tokens) come from the cache.
    assert {o.num_cached_tokens for o in out_second} == {40}
    assert out_second[0].num_prompt_tokens == len(second)
    assert computed["second"] == len(second) - 40 + (N - 1)  # its own prompt tail, then one token per decode
    assert computed["first"] == len(first) + N - 1
    # Same tokens as without the cache, and as transformers.
    no_prefix_engine.add_request(greedy("second", second, N))
    uncached = run_to_completion(no_prefix_engine)["second"]
    assert uncached[0].num_cached_tokens == 0
    assert tokens_of(out_second) == tokens_of(uncached) == hf_greedy(hf_model, second, N)


def test_requests_sharing_a_prefix_in_the_same_step(engine, computed, hf_model):
    fresh = random_prompt(43, seed=101)  # not seen by this engine before
    a = fresh + random_prompt(5, seed=3)
    b = fresh + random_prompt(12, seed=4)
    engine.add_request(greedy("a", a, N))
    engine.add_request(greedy("b", b, N))
    results = run_to_completion(engine)
    # b reads the blocks a writes in the same forward: every layer stores k/v before it attends.
    assert results["a"][0].num_cached_tokens == 0 and results["b"][0].num_cached_tokens == 40
    assert computed["b"] == len(b) - 40 + N - 1
    assert tokens_of(results["a"]) == hf_greedy(hf_model, a, N)
    assert tokens_of(results["b"]) == hf_greedy(hf_model, b, N)


def test_identical_block_aligned_prompt_recomputes_only_its_last_block(engine, computed, hf_model):
    prompt = random_prompt(32, seed=5)  # exactly 4 blocks
    engine.add_request(greedy("once", prompt, N))
    once = run_to_completion(engine)["once"]
    engine.add_request(greedy("twice", prompt, N))
    twice = run_to_completion(engine)["twice"]
    # The block holding the last prompt token is computed again, to get its logits.
    assert twice[0].num_cached_tokens == 24
    assert computed["twice"] == 8 + N - 1
    assert tokens_of(twice) == tokens_of(once) == hf_greedy(hf_model, prompt, N)


def test_generated_tokens_are_cached_for_a_follow_up_turn(engine, computed, hf_model):
    prompt = random_prompt(20, seed=6)
    engine.add_request(greedy("turn-1", prompt, 12))
    reply = tokens_of(run_to_completion(engine)["turn-1"])
    follow_up = prompt + reply + random_prompt(4, seed=7)  # a chat's next turn repeats the whole history
    engine.add_request(greedy("turn-2", follow_up, N))
    out = run_to_completion(engine)["turn-2"]
    # Prompt + all but the last reply token were computed in turn 1: 31 tokens, 3 full blocks.
    assert out[0].num_cached_tokens == 24
    assert tokens_of(out) == hf_greedy(hf_model, follow_up, N)


def test_evicted_prefix_is_recomputed_correctly(small_cache_engine, hf_model):
    engine = small_cache_engine
    shared = random_prompt(24, seed=8)
    engine.add_request(greedy("warm", shared + [7], N))
    run_to_completion(engine)
    assert engine.block_manager.num_cached_blocks >= 3
    # Unrelated work that needs every block evicts the cached prefix.
    engine.add_request(greedy("flood", random_prompt(80, seed=9), N))
    run_to_completion(engine)
    again = shared + [9, 10]
    engine.add_request(greedy("again", again, N))
    out = run_to_completion(engine)["again"]
    assert out[0].num_cached_tokens < 24
    assert tokens_of(out) == hf_greedy(hf_model, again, N)
