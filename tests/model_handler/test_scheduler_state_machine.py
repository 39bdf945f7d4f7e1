"""A hypothesis state machine over the scheduler and block manager: random traffic keeps every invariant.

Requests with shared prompt prefixes (and follow-ups that extend an earlier request's tokens) are added and
aborted at random while steps run on a small KV cache with a small prefill budget, so prefix-cache hits,
chunked prefill and preemption happen all the time. Steps go the plain way (schedule, then update with the
chosen tokens) or the engine's async way (launch the next step on placeholders, then resolve the one before),
mirroring `Engine.step`. The "model" chooses tokens (EOS, stop tokens, plain ones) and a shadow of the KV cache
records what it wrote where. After every rule `scheduler_invariants` checks the state; the teardown drains
every request. The bound comes from the hypothesis profile (tests/conftest.py).
"""

from __future__ import annotations

import sys
from collections import Counter, deque

import torch
from hypothesis import event
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from model_handler.engine_protocol import EngineRequest, FinishReason
from model_handler.prompt_logprobs import take_prompt_logprobs
from model_handler.sampling_params import SamplingParams
from model_handler.scheduler import ScheduledSequence, SchedulerOutput
from model_handler.sequence import Sequence
from tests.model_handler.engine_factories import EOS, create_scheduler
from tests.model_handler.scheduler_invariants import (
    KvShadow,
    cdiv,
    check_block_manager,
    check_outputs,
    check_scheduler,
)

STOP_IDS = (2, 3)
PLAIN_IDS = (4, 5, 6, 7)
SHARED_PREFIXES = ((4, 5, 6, 7, 4, 5, 6, 7, 4, 5, 6, 7), (7, 7, 6, 6, 5, 5, 4, 4, 7, 6, 5, 4))
VOCAB_SIZE = 8
MAX_NUM_SEQS = 5
MAX_DRAIN_STEPS = 5000
STEP_TOKENS = st.lists(
    st.lists(st.sampled_from((EOS, *STOP_IDS, *PLAIN_IDS)), min_size=MAX_NUM_SEQS, max_size=MAX_NUM_SEQS),
    min_size=1,
    max_size=6,
)
"""One to six steps; each gives the model's token (EOS, a stop token, a plain one) for every sampling row."""

InFlight = list[tuple[Sequence, int]]
"""A launched step's sampling rows: each sequence with the token the device chose for it (not yet read)."""


class SchedulerMachine(RuleBasedStateMachine):
    coverage: Counter[str] = Counter()
    """What the runs exercised, summed over every example (the test checks each case happened)."""

    @initialize(
        num_blocks=st.integers(3, 16),
        block_size=st.sampled_from([1, 2, 4]),
        max_num_seqs=st.integers(1, MAX_NUM_SEQS),
        max_num_prefill_tokens=st.integers(1, 12),
        max_model_len=st.integers(8, 32),
        prefix_caching=st.sampled_from([True, True, False]),
    )
    def configure(self, num_blocks, block_size, max_num_seqs, max_num_prefill_tokens, max_model_len, prefix_caching):
        self.scheduler = create_scheduler(
            num_blocks, block_size, max_num_seqs, max_num_prefill_tokens, max_model_len, prefix_caching
        )
        self.manager = self.scheduler.block_manager
        self.kv = KvShadow(num_blocks, block_size)
        self.everyone: list[Sequence] = []
        self.emitted: dict[str, list[int]] = {}
        self.pending: dict[str, deque[int]] = {}
        """The chosen tokens behind each sequence's placeholders, oldest first."""
        self.in_flight: InFlight | None = None

    # ---- rules ---------------------------------------------------------------------------------------------

    @rule(
        follow_up=st.booleans(),
        pick=st.integers(0, 63),
        num_taken=st.integers(0, 32),
        suffix=st.lists(st.sampled_from(PLAIN_IDS), max_size=8),
        max_tokens=st.integers(1, 8),
        min_tokens=st.integers(0, 8),
        ignore_eos=st.booleans(),
        stop_ids=st.lists(st.sampled_from(STOP_IDS), unique=True),
        prompt_logprobs=st.sampled_from([None] * 7 + [1]),
    )
    def add(self, follow_up, pick, num_taken, suffix, max_tokens, min_tokens, ignore_eos, stop_ids, prompt_logprobs):
        """A request whose prompt starts like others' (or extends an earlier request's known tokens), sized as
        the engine admits it: prompt + max_tokens within the model length and the whole cache."""
        if follow_up and self.everyone:
            earlier = self.everyone[pick % len(self.everyone)]
            base = earlier.token_ids[: min(num_taken, earlier.num_tokens - earlier.num_pending_tokens)]
        else:
            base = list(SHARED_PREFIXES[pick % len(SHARED_PREFIXES)][:num_taken])
        limit = min(self.scheduler.max_model_len, self.manager.num_blocks * self.manager.block_size + 1)
        max_tokens = min(max_tokens, limit - 1)
        prompt = (base + suffix or [PLAIN_IDS[0]])[: limit - max_tokens]
        params = SamplingParams(
            max_tokens=max_tokens,
            min_tokens=min(min_tokens, max_tokens),
            ignore_eos=ignore_eos,
            stop_token_ids=tuple(stop_ids),
            prompt_logprobs=prompt_logprobs,
        )
        seq = Sequence(EngineRequest(f"r{len(self.everyone)}", prompt, params), (EOS,))
        self.scheduler.add(seq)
        self.everyone.append(seq)
        self.emitted[seq.request_id] = []
        self.pending[seq.request_id] = deque()

    @precondition(lambda self: self.everyone)
    @rule(picks=st.lists(st.integers(0, 63), min_size=1, max_size=3))
    def abort(self, picks):
        """Abort some requests: running, waiting, already finished (ignored), in flight or not."""
        chosen = list({id(s): s for s in (self.everyone[i % len(self.everyone)] for i in picks)}.values())
        live = [seq for seq in chosen if not seq.is_finished]
        aborted = self.scheduler.abort([seq.request_id for seq in chosen])
        assert aborted == live, f"abort returned {aborted}, expected {live}"
        for seq in aborted:
            assert seq.finish_reason is FinishReason.ABORTED and not seq.block_table
            self.pending[seq.request_id].clear()  # a token read for it later is dropped
            self.coverage["aborted"] += 1

    @rule(steps=STEP_TOKENS)
    def step(self, steps):
        """The engine's plain steps: schedule, run, update with the chosen tokens (a launched step is read
        first). Each step's sampling rows take its tokens in order."""
        for tokens in steps:
            self._step(tokens)

    @rule(steps=STEP_TOKENS)
    def launch(self, steps):
        """The engine's async steps: schedule on placeholders, launch (tokens chosen now, read later), then read
        the step launched before. As `Engine.step`, the plain way while a request needs its prompt's logits."""
        for tokens in steps:
            if any(seq.sampling_params.prompt_logprobs is not None for seq in self.scheduler.requests.values()):
                self._step(tokens)
            else:
                self._launch(tokens)

    def _launch(self, tokens: list[int]) -> None:
        previous, self.in_flight = self.in_flight, None
        out = self._schedule(previous)
        self._write_kv(out)
        sampled = self.scheduler.advance(out)
        assert sampled == [e.seq for e in out.scheduled if e.samples]
        tokens = tokens[: len(sampled)]
        for seq, token_id in zip(sampled, tokens):
            self.pending[seq.request_id].append(token_id)
        if not out.is_empty:
            self.in_flight = list(zip(sampled, tokens))
        if previous is not None:
            self._read(previous)

    # ---- invariants ----------------------------------------------------------------------------------------

    @invariant()
    def blocks_are_consistent(self):
        check_block_manager(self.manager, self.scheduler.running)
        self.kv.check_cached_blocks(self.manager)

    @invariant()
    def queues_are_consistent(self):
        check_scheduler(self.scheduler, self.everyone)
        for seq in self.scheduler.running:
            self.kv.check_sequence(seq, self._true_tokens(seq))

    @invariant()
    def outputs_follow_the_stop_rules(self):
        for seq in self.everyone:
            if seq.num_pending_tokens != len(self.pending[seq.request_id]) and not seq.is_finished:
                raise AssertionError(f"{seq} has {seq.num_pending_tokens} placeholders for {self.pending}")
            check_outputs(seq, self.emitted[seq.request_id], self.scheduler.max_model_len, self.scheduler.eos_token_ids)

    def teardown(self):
        """Every request finishes: steps with plain tokens drain the scheduler, then every block is free."""
        if sys.exc_info()[1] is not None or not hasattr(self, "scheduler"):
            return  # a rule or invariant failed (or the run never started): leave that error be
        for _ in range(MAX_DRAIN_STEPS):
            if not self.scheduler.num_unfinished and self.in_flight is None:
                break
            self._step([PLAIN_IDS[0]] * MAX_NUM_SEQS)
            self.blocks_are_consistent()
            self.queues_are_consistent()
            self.outputs_follow_the_stop_rules()
        else:
            raise AssertionError(f"not drained after {MAX_DRAIN_STEPS} steps: {self.scheduler.requests}")
        assert all(seq.is_finished for seq in self.everyone)
        assert self.manager.num_free_blocks == self.manager.num_blocks and not any(self.manager.ref_counts)
        self.coverage["drained"] += 1

    # ---- helpers -------------------------------------------------------------------------------------------

    def _schedule(self, previous: InFlight | None) -> SchedulerOutput:
        """schedule(), checked: budgets, block coverage, preemption and placeholder rules, progress."""
        was_running = {id(s): s.num_tokens - s.num_computed_tokens for s in self.scheduler.running}
        out = self.scheduler.schedule()
        bs, entries = self.manager.block_size, out.scheduled
        assert len({id(e.seq) for e in entries}) == len(entries) <= self.scheduler.max_num_seqs
        num_prompt_tokens = 0
        for e in entries:
            seq, end = e.seq, e.num_computed_tokens + e.num_new_tokens
            assert e.num_new_tokens >= 1 and e.num_computed_tokens == seq.num_computed_tokens and end <= seq.num_tokens
            assert e.samples == (end == seq.num_tokens) and len(seq.block_table) == cdiv(end, bs)
            is_decode = was_running.get(id(seq)) == 1
            num_prompt_tokens += 0 if is_decode else e.num_new_tokens
            self.coverage["prefix hit"] += id(seq) not in was_running and e.num_computed_tokens > 0
            self.coverage["chunked prefill"] += not e.samples
            self._check_placeholders(e.seq, e.num_computed_tokens, end, previous)
            self._check_prompt_logit_rows(e, id(seq) in was_running)
        assert out.num_prompt_logit_rows <= self.scheduler.max_prompt_logit_rows, "too many prompt logit rows"
        assert num_prompt_tokens <= self.scheduler.max_num_prefill_tokens, "prefill budget exceeded"
        for seq in out.preempted:
            assert id(seq) in was_running and not seq.block_table and seq in self.scheduler.waiting
            assert all(e.seq is not seq for e in entries)
            self.coverage["preempted" + (" in flight" if seq.num_pending_tokens else "")] += 1
        if out.preempted:
            assert all(id(e.seq) in was_running for e in entries), "a newcomer joined a step that preempted"
        if out.is_empty and previous is None:
            assert not self.scheduler.num_unfinished, f"nothing scheduled, nothing in flight: {self.scheduler.requests}"
        event(f"batch of {len(entries)}")
        return out

    def _check_prompt_logit_rows(self, e: ScheduledSequence, was_running: bool) -> None:
        """A request with prompt logprobs reads no cached KV (a cached block has no logits) and scores each
        prompt position once, in order, in the step computing it."""
        seq = e.seq
        if seq.sampling_params.prompt_logprobs is None:
            assert e.num_prompt_logit_rows == 0
            return
        if not was_running and seq.needs_prompt_logits:
            assert e.num_computed_tokens == 0, f"{seq} needs its prompt's logits but took cached blocks"
        if e.num_prompt_logit_rows:
            assert e.prompt_logits_start == len(seq.prompt_logprobs) >= e.num_computed_tokens
            end = e.prompt_logits_start + e.num_prompt_logit_rows
            assert end <= min(e.num_computed_tokens + e.num_new_tokens, seq.num_prompt_tokens - 1)

    def _check_placeholders(self, seq: Sequence, start: int, end: int, previous: InFlight | None) -> None:
        """A chunk may hold one placeholder, as its last token, and only for a row of the step in flight (the
        engine patches it from that row on the device)."""
        if not seq.num_pending_tokens:
            return
        assert seq.num_pending_tokens == 1 and end == seq.num_tokens and start < end
        rows = [token for s, token in previous or [] if s is seq]
        assert rows == [self.pending[seq.request_id][0]], f"{seq}'s placeholder has no row in the step in flight"
        self.coverage["decode on a placeholder"] += 1

    def _step(self, tokens: list[int]) -> None:
        if self.in_flight is not None:
            previous, self.in_flight = self.in_flight, None
            self._read(previous)
            return
        out = self._schedule(None)
        self._write_kv(out)
        num_sampling = sum(e.samples for e in out.scheduled)
        if out.num_prompt_logit_rows:  # the engine's own bookkeeping, on logits of the right shape
            take_prompt_logprobs(out, torch.zeros(out.num_prompt_logit_rows + num_sampling, VOCAB_SIZE))
            self.coverage["prompt logprobs"] += out.num_prompt_logit_rows
        tokens = tokens[:num_sampling]
        sampled = self.scheduler.update_from_output(out, tokens)
        assert sampled == [e.seq for e in out.scheduled if e.samples]
        for seq, token_id in zip(sampled, tokens):
            self._hand_out(seq, token_id)

    def _true_tokens(self, seq: Sequence) -> list[int]:
        """`seq.token_ids` with each placeholder replaced by the token the device chose for it."""
        num_known = seq.num_tokens - seq.num_pending_tokens
        return seq.token_ids[:num_known] + list(self.pending[seq.request_id])[: seq.num_pending_tokens]

    def _write_kv(self, out: SchedulerOutput) -> None:
        for e in out.scheduled:
            self.kv.write(e.seq, self._true_tokens(e.seq), e.num_computed_tokens, e.num_new_tokens)

    def _read(self, step: InFlight) -> None:
        """Resolve a launched step: sequences finished or aborted since are skipped, the others get the token."""
        live = [(seq, token) for seq, token in step if not seq.is_finished]
        resolved = self.scheduler.resolve([seq for seq, _ in step], [token for _, token in step])
        assert resolved == live, f"resolve gave {resolved}, expected {live}"
        self.coverage["row run in vain"] += len(step) - len(live)
        for seq, token_id in resolved:
            assert self.pending[seq.request_id].popleft() == token_id
            self._hand_out(seq, token_id)
            if seq.is_finished:
                self.pending[seq.request_id].clear()  # a later placeholder was a step run in vain

    def _hand_out(self, seq: Sequence, token_id: int) -> None:
        self.emitted[seq.request_id].append(token_id)
        if seq.is_finished:
            self.coverage[f"finished: {seq.finish_reason.name}"] += 1
        elif token_id in seq.stop_token_ids:
            self.coverage["stop token before min_tokens"] += 1


def test_scheduler_keeps_every_invariant_under_random_traffic():
    SchedulerMachine.coverage.clear()
    run_state_machine_as_test(SchedulerMachine)
    covered = SchedulerMachine.coverage
    expected = [
        "prefix hit",
        "chunked prefill",
        "preempted",
        "preempted in flight",
        "decode on a placeholder",
        "row run in vain",
        "aborted",
        "stop token before min_tokens",
        "prompt logprobs",
        "drained",
        *(f"finished: {reason.name}" for reason in (FinishReason.EOS, FinishReason.STOP_TOKEN, FinishReason.LENGTH)),
    ]
    missing = [name for name in expected if not covered[name]]
    assert not missing, f"the runs never exercised {missing}: {dict(covered)}"
