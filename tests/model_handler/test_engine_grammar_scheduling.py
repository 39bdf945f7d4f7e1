"""Constrained requests in the engine's schedule: a matcher per request and one compile per constraint, a compile
error failing its request alone, matchers across preemption, the step loop never waiting for a compile, aborts
while compiling, and async scheduling."""

from __future__ import annotations

import json
import re
import threading

import pytest
import torch

from model_handler.constraints import Constraint, ConstraintKind
from model_handler.engine_protocol import EngineRequest, FinishReason
from model_handler.grammar_matcher import RequestGrammar
from model_handler.sampling_params import SamplingParams
from tests.model_handler.engine_factories import (
    create_engine,
    greedy,
    random_prompt,
    run_to_completion,
    tokens_of,
    wait_until_ready,
)

EOS = 2
WORDS = r"[a-z]{3,6}( [a-z]{3,6}){5,8}"
NUMBERS = Constraint(ConstraintKind.JSON_SCHEMA, json.dumps({"type": "array", "items": {"type": "integer"}}))


@pytest.fixture(scope="module")
def engine(test_model_dir):
    return create_engine(test_model_dir)


def sampled(request_id: str, constraint: Constraint | None, seed: int, **params) -> EngineRequest:
    params.setdefault("max_tokens", 120)
    sampling = SamplingParams(temperature=1.0, seed=seed, constraint=constraint, **params)
    return EngineRequest(request_id, random_prompt(6, seed=seed), sampling)


def text_of(outputs: list, tokenizer) -> str:
    token_ids = tokens_of(outputs)
    assert outputs[-1].finish_reason is FinishReason.EOS and token_ids[-1] == EOS
    return tokenizer.decode(token_ids[:-1])


def gate_compiles(engine, monkeypatch) -> threading.Event:
    """Hold every new compile of the engine until the returned event is set (a slow grammar, made to order)."""
    release = threading.Event()
    compile_now = engine.grammar_compiler._compile

    def gated(constraint: Constraint):
        if not release.wait(30):
            raise TimeoutError("the test never released the compile")
        return compile_now(constraint)

    monkeypatch.setattr(engine.grammar_compiler, "_compile", gated)
    return release


def test_requests_with_one_constraint_share_its_compile_but_not_their_matchers(engine, test_tokenizer):
    """n choices (or best_of candidates) are separate engine requests: each its own matcher, one grammar."""
    words = Constraint(ConstraintKind.REGEX, WORDS)
    compiles, hits = engine.grammar_compiler.num_compiles, engine.grammar_compiler.num_cache_hits
    for seed in (1, 2):
        engine.add_request(sampled(f"choice{seed}", words, seed))
    wait_until_ready(engine)
    engine.step()
    first, second = (engine.scheduler.requests[f"choice{seed}"] for seed in (1, 2))
    assert first.grammar is not None and second.grammar is not None and first.grammar is not second.grammar
    results = run_to_completion(engine)
    assert engine.grammar_compiler.num_compiles == compiles + 1
    assert engine.grammar_compiler.num_cache_hits == hits + 1
    texts = [text_of(results[f"choice{seed}"], test_tokenizer) for seed in (1, 2)]
    assert all(re.fullmatch(WORDS, text) for text in texts) and texts[0] != texts[1]


def test_a_constraint_that_does_not_compile_fails_its_request_alone(engine, test_model_dir, test_tokenizer):
    prompt = random_prompt(7, seed=3)
    alone = tokens_of(run_to_completion_with(engine, [greedy("alone", prompt, 10)])["alone"])
    bad = Constraint(ConstraintKind.JSON_SCHEMA, json.dumps({"type": "object", "properties": {"a": {"type": "strin"}}}))
    batch = [sampled("good", NUMBERS, 4), sampled("bad", bad, 5), greedy("free", prompt, 10)]
    results = run_to_completion_with(engine, batch)
    [refused] = results["bad"]  # one output, before any token
    assert refused.finish_reason is FinishReason.REJECTED and refused.new_token_ids == []
    assert refused.failure_message == 'the JSON schema is invalid: Unsupported type "strin"'
    assert tokens_of(results["free"]) == alone
    assert all(isinstance(n, int) for n in json.loads(text_of(results["good"], test_tokenizer)))


def run_to_completion_with(engine, requests: list[EngineRequest]) -> dict[str, list]:
    for request in requests:
        engine.add_request(request)
    return run_to_completion(engine)


def assert_matchers_follow_their_tokens(engine, compiled) -> None:
    """Every constrained request's matcher allows next exactly what a fresh one fed its output tokens allows."""
    for seq in engine.scheduler.requests.values():
        replayed = RequestGrammar(compiled)
        for token_id in seq.output_token_ids:
            assert replayed.accept(token_id)
        bitmasks = torch.zeros((2, 16), dtype=torch.int32)
        seq.grammar.fill(bitmasks, 0)
        replayed.fill(bitmasks, 1)
        assert torch.equal(bitmasks[0], bitmasks[1]), seq.request_id


def test_matchers_stay_with_their_tokens_across_preemption(test_model_dir, test_tokenizer):
    # 12 blocks of 8 tokens: three 20-token prompts fit (9 blocks), not once each has grown by 20 tokens.
    engine = create_engine(test_model_dir, KV_CACHE_CPU_BYTES="96KiB", PREFIX_CACHING="false")
    long_words = Constraint(ConstraintKind.REGEX, r"[a-z]{3,6}( [a-z]{3,6}){14,16}")
    for seed in range(3):
        prompt = random_prompt(20, seed=seed)
        engine.add_request(EngineRequest(f"w{seed}", prompt, SamplingParams(max_tokens=70, constraint=long_words)))
    compiled = engine.grammar_compiler.submit(long_words).result(30)
    results: dict[str, list] = {}
    num_checked = 0
    while engine.has_unfinished_requests():
        wait_until_ready(engine)
        preempted_before = engine.scheduler.num_preemptions
        for out in engine.step():
            results.setdefault(out.request_id, []).append(out)
        if engine.scheduler.num_preemptions > preempted_before:
            assert_matchers_follow_their_tokens(engine, compiled)
            num_checked += 1
    assert num_checked > 0, "no preemption happened"
    for seed in range(3):
        assert re.fullmatch(long_words.value, text_of(results[f"w{seed}"], test_tokenizer))


def test_the_step_loop_keeps_stepping_while_a_grammar_compiles(engine, test_tokenizer, monkeypatch):
    release = gate_compiles(engine, monkeypatch)
    slow = Constraint(ConstraintKind.REGEX, r"slow [a-z]{2,5}")  # new: compiled, not cached
    engine.add_request(sampled("slow", slow, 1))
    engine.add_request(greedy("fast", random_prompt(5, seed=9), 12))
    fast_tokens = []
    num_steps = 0
    while len(fast_tokens) < 12:
        for out in engine.step():
            assert out.request_id == "fast"
            fast_tokens += out.new_token_ids
        num_steps += 1
    assert num_steps == 12  # the prefill's step and one per decode: never a step spent waiting
    assert engine.has_unfinished_requests() and not engine.has_ready_requests()  # only the compile is left
    assert engine.stats()[1] == 1  # counted as waiting
    release.set()
    results = run_to_completion(engine)
    assert re.fullmatch(slow.value, text_of(results["slow"], test_tokenizer))


def test_a_request_aborted_while_its_grammar_compiles_ends_aborted(engine, monkeypatch):
    release = gate_compiles(engine, monkeypatch)
    engine.add_request(sampled("doomed", Constraint(ConstraintKind.REGEX, "[0-9]{2} aborted"), 1))
    engine.abort_requests(["doomed"])
    [out] = engine.step()
    assert out.request_id == "doomed" and out.finish_reason is FinishReason.ABORTED
    assert not engine.has_unfinished_requests()
    release.set()


def test_a_duplicate_id_is_refused_while_the_first_compiles(engine, monkeypatch):
    release = gate_compiles(engine, monkeypatch)
    engine.add_request(sampled("twice", Constraint(ConstraintKind.REGEX, "[0-9]{3} twice"), 1))
    with pytest.raises(ValueError, match="already running"):
        engine.add_request(sampled("twice", None, 1))
    release.set()
    run_to_completion(engine)


def test_constrained_requests_run_step_by_step_under_async_scheduling(test_model_dir, test_tokenizer):
    engine = create_engine(test_model_dir, ASYNC_SCHEDULING="1")
    prompts = [random_prompt(5, seed=20 + i) for i in range(3)]
    expected = {
        f"free{i}": tokens_of(run_to_completion_with(engine, [greedy(f"free{i}", p, 16)])[f"free{i}"])
        for i, p in enumerate(prompts)
    }
    batch = [greedy(f"free{i}", p, 16) for i, p in enumerate(prompts)] + [sampled("c", NUMBERS, 7)]
    for request in batch:
        engine.add_request(request)
    results: dict[str, list] = {}
    while engine.has_unfinished_requests():
        wait_until_ready(engine)
        for out in engine.step():
            results.setdefault(out.request_id, []).append(out)
        if "c" in engine.scheduler.requests:
            assert not engine._all_requests_can_overlap() and engine._in_flight is None
    assert {rid: tokens_of(results[rid]) for rid in expected} == expected
    assert all(isinstance(n, int) for n in json.loads(text_of(results["c"], test_tokenizer)))
