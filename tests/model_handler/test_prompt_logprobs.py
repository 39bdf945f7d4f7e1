"""Prompt logprobs on the real engine against transformers' own forward: one chunk or many, with a cached prefix,
under the per-step row cap, with async scheduling on; and the scheduler's bookkeeping across a preemption."""

from __future__ import annotations

import pytest
import torch

from model_handler.engine_protocol import EngineRequest
from model_handler.sampling_params import SamplingParams
from model_handler.sequence import Sequence
from tests.model_handler.engine_factories import (
    EOS,
    create_engine,
    create_scheduler,
    greedy,
    hf_greedy,
    random_prompt,
    run_to_completion,
    tokens_of,
)

N = 4
MODES = {"sync": "0", "async": "1"}


@pytest.fixture(scope="module", params=MODES)
def engine(test_model_dir, request):
    return create_engine(test_model_dir, ASYNC_SCHEDULING=MODES[request.param])


@pytest.fixture(scope="module")
def chunking_engine(test_model_dir):
    # 16-token prompt budget: a 40-token prompt takes three steps, the middle one sampling nothing.
    return create_engine(test_model_dir, MAX_BATCH_PREFILL_TOKENS="16")


@pytest.fixture(scope="module")
def capped_engine(test_model_dir):
    return create_engine(test_model_dir, MAX_BATCH_SIZE="4")  # at most 4 prompt rows read per step


def hf_prompt_logprobs(hf_model, prompt: list[int], k: int) -> list[tuple[float, list[int]]]:
    """(logprob of prompt token i, ids of the k most likely tokens at i) for i = 1 .. n-1."""
    with torch.no_grad():
        logits = hf_model(torch.tensor([prompt])).logits[0].float()  # [n, V]
    logprobs = torch.log_softmax(logits[:-1], dim=-1)  # [n-1, V]: position p scores token p + 1
    chosen = logprobs.gather(1, torch.tensor(prompt[1:])[:, None])[:, 0]
    top = logprobs.topk(k, dim=-1).indices if k else torch.empty(len(prompt) - 1, 0, dtype=torch.int64)
    return list(zip(chosen.tolist(), top.tolist(), strict=True))


def scoring(request_id: str, prompt: list[int], k: int, **params) -> EngineRequest:
    return greedy(request_id, prompt, N, prompt_logprobs=k, **params)


def check_against(hf_model, outputs: list, prompt: list[int], k: int) -> None:
    """The first output carries every prompt logprob, nothing else does, and they equal transformers'."""
    firsts = [o.prompt_logprobs for o in outputs]
    assert firsts[0] is not None and all(lp is None for lp in firsts[1:])
    expected = hf_prompt_logprobs(hf_model, prompt, k)
    got = firsts[0]
    assert [lp.token_id for lp in got] == prompt[1:]
    assert torch.allclose(torch.tensor([lp.logprob for lp in got]), torch.tensor([e[0] for e in expected]), atol=1e-4)
    for lp, (_, top_ids) in zip(got, expected, strict=True):
        assert [t for t, _ in lp.top] == top_ids


def test_one_chunk_matches_transformers_and_keeps_the_output(engine, hf_model):
    prompt = random_prompt(40, seed=101)
    engine.add_request(scoring("one", prompt, 3))
    outputs = run_to_completion(engine)["one"]
    check_against(hf_model, outputs, prompt, 3)
    assert tokens_of(outputs) == hf_greedy(hf_model, prompt, N)


def test_chunked_prefill_scores_every_chunk(chunking_engine, hf_model):
    prompt = random_prompt(40, seed=102)
    chunking_engine.add_request(scoring("chunked", prompt, 2))
    chunking_engine.add_request(greedy("plain", random_prompt(30, seed=103), N))  # shares the steps
    outputs = run_to_completion(chunking_engine)
    check_against(hf_model, outputs["chunked"], prompt, 2)
    assert tokens_of(outputs["chunked"]) == hf_greedy(hf_model, prompt, N)
    assert all(o.prompt_logprobs is None for o in outputs["plain"])


def test_a_cached_prefix_is_recomputed_for_its_logits(engine, hf_model):
    prompt = random_prompt(33, seed=104)
    engine.add_request(greedy("warm", prompt, N))
    run_to_completion(engine)
    engine.add_request(scoring("scored", prompt, 0))
    outputs = run_to_completion(engine)["scored"]
    assert outputs[0].num_cached_tokens == 0  # the cache was not read
    check_against(hf_model, outputs, prompt, 0)
    engine.add_request(greedy("again", prompt, N))
    assert run_to_completion(engine)["again"][0].num_cached_tokens == 32  # and is still there for others


def test_rows_per_step_are_capped_and_still_exact(capped_engine, hf_model):
    prompts = [random_prompt(n, seed=105 + n) for n in (21, 13)]
    steps = []
    runner = capped_engine.model_runner
    original = runner.execute

    def spy(out, patch=None):
        steps.append(out.num_prompt_logit_rows)
        return original(out, patch)

    runner.execute = spy
    try:
        for i, prompt in enumerate(prompts):
            capped_engine.add_request(scoring(f"capped-{i}", prompt, 1))
        outputs = run_to_completion(capped_engine)
    finally:
        runner.execute = original
    assert max(steps) == 4 and sum(steps) == 20 + 12
    for i, prompt in enumerate(prompts):
        check_against(hf_model, outputs[f"capped-{i}"], prompt, 1)


def test_a_one_token_prompt_has_no_prompt_logprobs(engine):
    engine.add_request(scoring("single", [7], 2))
    outputs = run_to_completion(engine)["single"]
    assert all(o.prompt_logprobs is None for o in outputs) and len(tokens_of(outputs)) == N


def test_a_preempted_sequence_scores_only_what_is_left_and_skips_the_cache():
    scheduler = create_scheduler(block_size=4, max_num_prefill_tokens=8)
    prompt = list(range(10, 30))
    request = EngineRequest("scored", prompt, SamplingParams(max_tokens=2, prompt_logprobs=0))
    seq = Sequence(request, (EOS,))
    scheduler.add(seq)
    first = scheduler.schedule().scheduled[0]
    assert (first.num_new_tokens, first.prompt_logits_start, first.num_prompt_logit_rows) == (8, 0, 8)
    seq.num_computed_tokens = 8
    seq.prompt_logprobs.extend([None] * 8)  # what the step recorded
    scheduler._preempt(seq)  # KV gone; the scored positions are not scored again
    entry = scheduler.schedule().scheduled[0]
    assert entry.num_computed_tokens == 0  # no prefix-cache hit: it still needs logits
    assert (entry.prompt_logits_start, entry.num_prompt_logit_rows) == (8, 0)
    seq.num_computed_tokens = 8
    entry = scheduler.schedule().scheduled[0]
    assert (entry.num_computed_tokens, entry.prompt_logits_start, entry.num_prompt_logit_rows) == (8, 8, 8)
    seq.num_computed_tokens = 16
    seq.prompt_logprobs.extend([None] * 8)
    last = scheduler.schedule().scheduled[0]
    assert (last.num_new_tokens, last.num_prompt_logit_rows, last.samples) == (4, 3, True)  # 19 scores in all
    scheduler.abort(["scored"])
