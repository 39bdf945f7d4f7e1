"""Scheduler: continuous batching, chunked prefill under the token budget, preemption, limits, stops."""

from __future__ import annotations

import pytest

from model_handler.engine_protocol import FinishReason
from model_handler.sequence import PLACEHOLDER_TOKEN, SequenceStatus
from tests.model_handler.engine_factories import (
    EOS,
    add_requests,
    create_requests,
    create_scheduler,
    num_new_tokens,
    run_step,
)


def run_until_done(scheduler, max_steps: int = 500) -> int:
    steps = 0
    while scheduler.num_unfinished:
        run_step(scheduler)
        steps += 1
        assert steps < max_steps, "scheduler made no progress"
    return steps


def test_prompts_prefill_then_decode_one_token_per_step():
    scheduler = create_scheduler()
    a, b = add_requests(scheduler, create_requests(2, prompt_len=6, max_tokens=3))
    out, sampled = run_step(scheduler)
    assert num_new_tokens(out) == {a.request_id: 6, b.request_id: 6}
    assert sampled == [a, b]
    out, _ = run_step(scheduler)
    assert num_new_tokens(out) == {a.request_id: 1, b.request_id: 1}
    assert out.num_batched_tokens == len(out.scheduled)  # decodes only
    run_step(scheduler)
    assert a.is_finished and b.is_finished
    assert a.finish_reason is FinishReason.LENGTH
    assert a.output_token_ids == [7, 7, 7]
    assert scheduler.block_manager.num_free_blocks == 64


def test_request_arriving_while_others_decode_joins_the_next_step():
    scheduler = create_scheduler()
    a, b = add_requests(scheduler, create_requests(2, prompt_len=5, max_tokens=10))
    run_step(scheduler)
    run_step(scheduler)
    (c,) = add_requests(scheduler, create_requests(1, prompt_len=9, max_tokens=2))
    out, sampled = run_step(scheduler)
    # One mixed step: two decodes and the newcomer's whole prompt.
    assert num_new_tokens(out) == {a.request_id: 1, b.request_id: 1, c.request_id: 9}
    assert out.num_batched_tokens > len(out.scheduled)
    assert sampled == [a, b, c]
    assert c.num_output_tokens == 1 and a.num_output_tokens == 3


def test_long_prompt_is_chunked_while_others_keep_decoding():
    scheduler = create_scheduler(max_num_prefill_tokens=8)
    a, b = add_requests(scheduler, create_requests(2, prompt_len=3, max_tokens=20))
    run_step(scheduler)
    (long,) = add_requests(scheduler, create_requests(1, prompt_len=20, max_tokens=2))
    chunks = []
    for _ in range(3):
        out, sampled = run_step(scheduler)
        new = num_new_tokens(out)
        # Decodes run every step on top of the prompt budget (TGI's MAX_BATCH_PREFILL_TOKENS counts prompt
        # tokens only), so the prompt gets the whole budget however many sequences decode.
        assert new[a.request_id] == 1 and new[b.request_id] == 1
        chunks.append(new[long.request_id])
        assert out.num_batched_tokens == 2 + chunks[-1]
        assert (long in sampled) == (sum(chunks) == 20)
    assert chunks == [8, 8, 4]
    assert long.num_output_tokens == 1
    assert a.num_output_tokens == 4


def test_many_decodes_never_shrink_the_prompt_budget():
    scheduler = create_scheduler(max_num_prefill_tokens=4, max_num_seqs=8)
    decoding = add_requests(scheduler, create_requests(6, prompt_len=2, max_tokens=30))
    while any(s.num_output_tokens == 0 for s in decoding):
        run_step(scheduler)
    (prompt,) = add_requests(scheduler, create_requests(1, prompt_len=10, max_tokens=2))
    out, _ = run_step(scheduler)
    new = num_new_tokens(out)
    assert all(new[s.request_id] == 1 for s in decoding)  # six decodes: more than the budget itself
    assert new[prompt.request_id] == 4 and out.num_batched_tokens == 10 and out.num_batched_tokens > len(out.scheduled)


def test_budget_smaller_than_a_prompt_with_nothing_else_running():
    scheduler = create_scheduler(max_num_prefill_tokens=4)
    (seq,) = add_requests(scheduler, create_requests(1, prompt_len=10, max_tokens=2))
    sizes = [num_new_tokens(run_step(scheduler)[0])[seq.request_id] for _ in range(4)]
    assert sizes == [4, 4, 2, 1]
    assert seq.num_output_tokens == 2 and seq.is_finished


def test_max_num_seqs_caps_the_running_batch():
    scheduler = create_scheduler(max_num_seqs=2)
    seqs = add_requests(scheduler, create_requests(5, prompt_len=4, max_tokens=3))
    out, _ = run_step(scheduler)
    assert len(out.scheduled) == 2
    assert len(scheduler.running) == 2 and len(scheduler.waiting) == 3
    while scheduler.num_unfinished:
        out, _ = run_step(scheduler)
        assert len(out.scheduled) <= 2
    assert all(s.num_output_tokens == 3 for s in seqs)


def test_preemption_when_blocks_run_out_and_the_victim_finishes_later():
    # 6 blocks of 4 tokens: two sequences of 8 prompt tokens cannot both grow to 16 tokens.
    scheduler = create_scheduler(num_blocks=6, block_size=4, enable_prefix_caching=False)
    first, second = add_requests(scheduler, create_requests(2, prompt_len=8, max_tokens=8))
    preempted = []
    steps = 0
    while scheduler.num_unfinished:
        out, _ = run_step(scheduler)
        preempted += out.preempted
        steps += 1
        for seq in scheduler.running:
            assert len(seq.block_table) * 4 >= seq.num_computed_tokens
        assert steps < 100
    # The newest running sequence was the victim, and it was recomputed from prompt + its outputs.
    assert preempted and preempted[0] is second
    assert first.num_output_tokens == 8 and second.num_output_tokens == 8
    assert first.finish_reason is second.finish_reason is FinishReason.LENGTH
    assert scheduler.block_manager.num_free_blocks == 6


def test_preempted_sequence_goes_back_to_the_front_and_recomputes_its_outputs():
    scheduler = create_scheduler(num_blocks=5, block_size=4, enable_prefix_caching=False)
    first, second = add_requests(scheduler, create_requests(2, prompt_len=8, max_tokens=8))
    (third,) = add_requests(scheduler, create_requests(1, prompt_len=8, max_tokens=1))
    out, _ = run_step(scheduler)  # both prompts: 4 blocks; the third waits for blocks
    assert {e.seq.request_id for e in out.scheduled} == {first.request_id, second.request_id}
    out, _ = run_step(scheduler)  # token 9 of each needs a new block; only one is free
    assert out.preempted == [second] and second.status is SequenceStatus.WAITING
    assert list(scheduler.waiting) == [second, third]  # ahead of the request that arrived later
    assert second.block_table == [] and second.num_computed_tokens == 0
    num_outputs = second.num_output_tokens
    entry = None
    while entry is None:
        out, _ = run_step(scheduler)
        entry = next((e for e in out.scheduled if e.seq is second), None)
    # Readmitted: its prompt and the outputs it already has are computed again, then it samples on.
    assert entry.num_computed_tokens == 0 and entry.num_new_tokens == 8 + num_outputs and entry.samples
    assert second.num_output_tokens == num_outputs + 1
    run_until_done(scheduler)
    assert [s.num_output_tokens for s in (first, second, third)] == [8, 8, 1]
    assert scheduler.block_manager.num_free_blocks == 5


def test_abort_frees_blocks_of_running_and_waiting_requests():
    scheduler = create_scheduler(max_num_seqs=1)
    a, b = add_requests(scheduler, create_requests(2, prompt_len=9, max_tokens=5))
    run_step(scheduler)
    assert scheduler.block_manager.num_free_blocks < 64
    aborted = scheduler.abort([a.request_id, b.request_id, "unknown"])
    assert aborted == [a, b]
    assert a.finish_reason is FinishReason.ABORTED and a.is_finished
    assert scheduler.num_unfinished == 0
    assert scheduler.block_manager.num_free_blocks == 64
    assert scheduler.schedule().is_empty


def test_duplicate_request_id_is_rejected():
    scheduler = create_scheduler()
    (request,) = create_requests(1)
    add_requests(scheduler, [request])
    with pytest.raises(ValueError):
        add_requests(scheduler, [request])


def test_eos_stops_unless_ignored_or_before_min_tokens():
    scheduler = create_scheduler()
    plain, ignoring, patient = add_requests(
        scheduler,
        create_requests(1, max_tokens=5)
        + create_requests(1, max_tokens=5, ignore_eos=True)
        + create_requests(1, max_tokens=5, min_tokens=2),
    )
    run_step(scheduler, token_id=EOS)
    assert plain.finish_reason is FinishReason.EOS and plain.output_token_ids == [EOS]
    assert not ignoring.is_finished and not patient.is_finished
    run_step(scheduler, token_id=EOS)
    assert patient.finish_reason is FinishReason.EOS and patient.num_output_tokens == 2
    run_until_done(scheduler)
    assert ignoring.finish_reason is FinishReason.LENGTH and ignoring.num_output_tokens == 5


def test_stop_token_ids_and_model_length():
    scheduler = create_scheduler(max_model_len=10)
    stopper, long = add_requests(
        scheduler, create_requests(1, max_tokens=5, stop_token_ids=(7,)) + create_requests(1, max_tokens=50)
    )
    run_step(scheduler, token_id=7)
    assert stopper.finish_reason is FinishReason.STOP_TOKEN
    run_until_done(scheduler)
    assert long.finish_reason is FinishReason.LENGTH and long.num_tokens == 10


def test_shared_prefix_is_computed_once():
    scheduler = create_scheduler(block_size=4)
    shared = list(range(100, 116))  # 4 blocks
    from model_handler.engine_protocol import EngineRequest
    from model_handler.sampling_params import SamplingParams

    a, b = add_requests(
        scheduler,
        [
            EngineRequest("a", shared + [1, 2, 3], SamplingParams(max_tokens=2)),
            EngineRequest("b", shared + [4, 5], SamplingParams(max_tokens=2)),
        ],
    )
    out, _ = run_step(scheduler)
    # b's prefix blocks were registered by a in the same step: b computes only its own 2 tokens.
    assert num_new_tokens(out) == {"a": 19, "b": 2}
    assert b.num_cached_tokens == 16 and a.num_cached_tokens == 0
    run_until_done(scheduler)
    assert scheduler.block_manager.num_free_blocks == 64


# ---- async scheduling: a launched step's tokens are read one step later ---------------------------------


def launch(scheduler):
    """Schedule and `advance` as the engine does when it launches a step without reading its tokens."""
    out = scheduler.schedule()
    return out, scheduler.advance(out)


def test_next_step_is_scheduled_on_placeholders_and_resolved_in_order():
    scheduler = create_scheduler()
    (a,) = add_requests(scheduler, create_requests(1, prompt_len=6, max_tokens=3))
    _, first = launch(scheduler)  # the prefill
    assert first == [a] and a.token_ids[-1] == PLACEHOLDER_TOKEN and a.num_pending_tokens == 1
    out, second = launch(scheduler)  # the first decode computes the placeholder's position
    assert num_new_tokens(out) == {a.request_id: 1} and a.num_pending_tokens == 2
    assert scheduler.resolve(first, [21]) == [(a, 21)]
    assert a.output_token_ids == [21, PLACEHOLDER_TOKEN] and a.num_pending_tokens == 1
    _, third = launch(scheduler)
    assert scheduler.resolve(second, [22]) == [(a, 22)]
    # Its third token is its last (max_tokens): nothing is scheduled on that placeholder.
    assert scheduler.schedule().is_empty and not a.is_finished
    assert scheduler.resolve(third, [23]) == [(a, 23)]
    assert a.is_finished and a.finish_reason is FinishReason.LENGTH and a.output_token_ids == [21, 22, 23]
    assert scheduler.block_manager.num_free_blocks == 64


def test_eos_read_late_drops_the_step_run_in_vain():
    scheduler = create_scheduler()
    a, b = add_requests(scheduler, create_requests(2, prompt_len=5, max_tokens=10))
    _, first = launch(scheduler)
    _, second = launch(scheduler)  # both decode on placeholders
    assert scheduler.resolve(first, [EOS, 30]) == [(a, EOS), (b, 30)]
    assert a.is_finished and a.finish_reason is FinishReason.EOS
    assert a.output_token_ids == [EOS] and a.num_pending_tokens == 0  # the second placeholder is gone
    assert scheduler.running == [b]
    assert scheduler.resolve(second, [99, 31]) == [(b, 31)]  # a's token from the wasted row is dropped
    assert b.output_token_ids == [30, 31]


def test_sequence_preempted_while_its_step_is_in_flight_keeps_its_token():
    scheduler = create_scheduler(num_blocks=4, block_size=4)  # two 8-token prompts fill it; a 9th token won't fit
    a, b = add_requests(scheduler, create_requests(2, prompt_len=8, max_tokens=4))
    _, first = launch(scheduler)
    out, _ = launch(scheduler)
    assert out.preempted == [b] and b.status is SequenceStatus.WAITING and b.num_computed_tokens == 0
    scheduler.resolve(first, [40, 41])
    assert b.output_token_ids == [41] and b.num_pending_tokens == 0
    assert list(scheduler.waiting) == [b]  # recomputed from its tokens, the read one included, later


def test_generated_block_is_keyed_for_the_prefix_cache_once_its_token_is_read():
    scheduler = create_scheduler(block_size=4)
    (a,) = add_requests(scheduler, create_requests(1, prompt_len=3, max_tokens=6))
    _, first = launch(scheduler)  # prompt 3 tokens; the 4th (a placeholder) completes block 0
    _, second = launch(scheduler)
    manager = scheduler.block_manager
    assert manager.num_cached_blocks == 0  # a block ending in a placeholder has no key yet
    scheduler.resolve(first, [50])
    assert manager.num_cached_blocks == 1 and manager.block_tokens[a.block_table[0]] == (*a.token_ids[:3], 50)
