"""Scheduler: which sequences run in the next step and how many tokens each computes.

Every running sequence that decodes gets its one token in every step (at most max_num_seqs of them); the
prefill token budget (TGI's MAX_BATCH_PREFILL_TOKENS: prompt tokens only) is filled with prompt chunks on top,
so a long prompt is split over several steps while the others keep decoding in the same steps, and the
number of decodes running never shrinks how much prompt a step computes. When
KV blocks run out, the newest running sequence is preempted: its blocks are freed and it goes back to
the front of the waiting queue, to be recomputed from its tokens later.

A request that asks for prompt logprobs needs the logits of its prompt positions: it never reads the prefix cache
(a cached block has KV but no logits, so it is recomputed, as vLLM does), and the prompt rows a step reads are
capped at max_num_seqs, so a step's logits never outgrow what the start-up warm-up measured by much.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from model_handler.block_manager import BlockManager
from model_handler.engine_protocol import FinishReason
from model_handler.model_layout import RopeLengthRule
from model_handler.sequence import Sequence, SequenceStatus


@dataclass(slots=True)
class ScheduledSequence:
    seq: Sequence
    num_computed_tokens: int
    """Tokens whose KV is already cached when the step starts (the context before the new tokens)."""
    num_new_tokens: int
    """Tokens computed this step: token_ids[num_computed_tokens : num_computed_tokens + num_new_tokens]."""
    samples: bool
    """True when this step reaches the end of the sequence's tokens, so its last logits are sampled."""
    prompt_logits_start: int = 0
    """Requests with prompt logprobs: the first position of this chunk whose logits are read for them."""
    num_prompt_logit_rows: int = 0
    """How many positions from `prompt_logits_start` on; each one's logits score the prompt token after it."""

    @classmethod
    def of(cls, seq: Sequence, num_new_tokens: int) -> ScheduledSequence:
        start = seq.num_computed_tokens
        entry = cls(seq, start, num_new_tokens, start + num_new_tokens == seq.num_tokens)
        if seq.needs_prompt_logits:
            # Positions scored before a preemption are recomputed for their KV only.
            entry.prompt_logits_start = max(start, len(seq.prompt_logprobs))
            end = min(start + num_new_tokens, seq.num_prompt_tokens - 1)
            entry.num_prompt_logit_rows = max(0, end - entry.prompt_logits_start)
        return entry


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledSequence] = field(default_factory=list)
    num_batched_tokens: int = 0
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled

    @property
    def num_prompt_logit_rows(self) -> int:
        return sum(entry.num_prompt_logit_rows for entry in self.scheduled)


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_prefill_tokens: int,
        max_model_len: int,
        eos_token_ids: tuple[int, ...] = (),
        rope_length_rule: RopeLengthRule | None = None,
    ) -> None:
        """`rope_length_rule`: the model's length-dependent rope, whose sequences may need recomputing as they grow."""
        self.block_manager = block_manager
        self.rope_length_rule = rope_length_rule
        self.max_num_seqs = max_num_seqs
        self.max_num_prefill_tokens = max_num_prefill_tokens
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(eos_token_ids)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.requests: dict[str, Sequence] = {}
        self.num_preemptions = 0
        """Running total, for metrics and tests."""
        self.max_prompt_logit_rows = max_num_seqs
        """Prompt positions whose logits one step reads for prompt logprobs (as many as the rows that sample)."""

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seq: Sequence) -> None:
        if seq.request_id in self.requests:
            raise ValueError(f"request id {seq.request_id!r} is already running")
        self.requests[seq.request_id] = seq
        self.waiting.append(seq)

    def abort(self, request_ids: list[str]) -> list[Sequence]:
        """Finish these requests now and free their blocks; unknown ids are ignored."""
        aborted = []
        for request_id in request_ids:
            seq = self.requests.get(request_id)
            if seq is None:
                continue
            if seq.status is SequenceStatus.RUNNING:
                self.running.remove(seq)
            else:
                self.waiting.remove(seq)
            seq.finish_reason = FinishReason.ABORTED
            self._finish(seq)
            aborted.append(seq)
        return aborted

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_prefill_tokens  # prompt tokens; decodes come on top of it
        scheduled: dict[int, ScheduledSequence] = {}  # id(seq) -> entry, in scheduling order
        charged: dict[int, int] = {}  # id(seq) -> prompt tokens of the budget its entry took
        rows_left = self.max_prompt_logit_rows
        # Decodes first (one token each), then running prefill chunks, oldest first within each group. A
        # sequence whose pending token is its last (async scheduling) only waits for that token to be read.
        order = [
            s
            for s in self.running
            if s.num_tokens - s.num_computed_tokens == 1
            and not (s.num_pending_tokens and s.reached_length_limit(self.max_model_len))
        ]
        order += [s for s in self.running if s.num_tokens - s.num_computed_tokens > 1]
        for seq in order:
            remaining = seq.num_tokens - seq.num_computed_tokens
            decodes = remaining == 1
            if seq.status is not SequenceStatus.RUNNING or (budget == 0 and not decodes):
                continue  # preempted earlier in this loop, or no prompt budget left
            rule = self.rope_length_rule
            if rule is not None and rule.needs_restart(seq.rope_base_len, seq.num_tokens):
                self._restart(seq)  # recomputed below, among the waiting, with its rotation counted from its length
                continue
            self.block_manager.drop_outside_window(seq)  # blocks no layer's window reaches any more
            num_new = 1 if decodes else min(remaining, budget)
            if not decodes and seq.needs_prompt_logits:
                num_new = self._fit_prompt_logit_rows(seq, num_new, rows_left)
                if num_new == 0:
                    continue
            while not self.block_manager.can_append(seq, num_new):
                victim = self.running[-1]
                popped = scheduled.pop(id(victim), None)
                if popped is not None:
                    budget += charged.pop(id(victim), 0)
                    rows_left += popped.num_prompt_logit_rows
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                continue
            self.block_manager.may_append(seq, num_new)
            scheduled[id(seq)] = entry = ScheduledSequence.of(seq, num_new)
            rows_left -= entry.num_prompt_logit_rows
            if not decodes:
                charged[id(seq)] = num_new
                budget -= num_new
        # New requests join only when nothing had to be preempted: otherwise they would thrash.
        while self.waiting and budget > 0 and not out.preempted and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            needs_logits = seq.needs_prompt_logits
            cached = [] if needs_logits else self.block_manager.match_prefix(seq)
            num_new = min(seq.num_tokens - len(cached) * self.block_manager.block_size, budget)
            if needs_logits:
                num_new = self._fit_prompt_logit_rows(seq, num_new, rows_left)
            if num_new == 0 or not self.block_manager.can_allocate(seq, cached, num_new):
                break
            self.waiting.popleft()
            self.block_manager.allocate(seq, cached, num_new)
            self.block_manager.drop_outside_window(seq)  # a long cached prefix: its blocks before the window
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled[id(seq)] = entry = ScheduledSequence.of(seq, num_new)
            rows_left -= entry.num_prompt_logit_rows
            budget -= num_new
        out.scheduled = list(scheduled.values())
        out.num_batched_tokens = sum(entry.num_new_tokens for entry in out.scheduled)
        return out

    @staticmethod
    def _fit_prompt_logit_rows(seq: Sequence, num_new: int, rows_left: int) -> int:
        """The most of `num_new` next tokens of `seq` whose prompt logit rows fit in `rows_left` (0: none)."""
        start = seq.num_computed_tokens
        first = max(start, len(seq.prompt_logprobs))
        if min(start + num_new, seq.num_prompt_tokens - 1) - first <= rows_left:
            return num_new
        return first - start + rows_left

    def update_from_output(self, out: SchedulerOutput, sampled_token_ids: list[int]) -> list[Sequence]:
        """Advance progress, append each sampling sequence's token (in order) and finish the done ones.

        Returns the sequences that got a token this step (finished ones have `finish_reason` set).
        """
        sampled: list[Sequence] = []
        tokens = iter(sampled_token_ids)
        for entry in out.scheduled:
            seq = entry.seq
            seq.num_computed_tokens = entry.num_computed_tokens + entry.num_new_tokens
            if not entry.samples:
                continue
            sampled.append(seq)
            if seq.append_token(next(tokens), self.max_model_len, self.eos_token_ids):
                self.running.remove(seq)
                self._finish(seq)
        return sampled

    def advance(self, out: SchedulerOutput) -> list[Sequence]:
        """Async scheduling: a launched step's progress before its tokens are read. Each sampling sequence
        gets a placeholder, so the next step can be scheduled now; returns them in sampling order."""
        sampled: list[Sequence] = []
        for entry in out.scheduled:
            seq = entry.seq
            seq.num_computed_tokens = entry.num_computed_tokens + entry.num_new_tokens
            if entry.samples:
                seq.append_placeholder()
                sampled.append(seq)
        return sampled

    def resolve(self, seqs: list[Sequence], token_ids: list[int]) -> list[tuple[Sequence, int]]:
        """Async scheduling: the tokens `advance` held places for have been read; finish the done sequences.

        Returns (sequence, token) for each that got one. A sequence that finished or was aborted since its
        step was launched is skipped (its token came from a step run in vain)."""
        resolved: list[tuple[Sequence, int]] = []
        for seq, token_id in zip(seqs, token_ids, strict=True):
            if seq.is_finished:
                continue
            index = seq.num_tokens - seq.num_pending_tokens
            done = seq.resolve_placeholder(token_id, self.max_model_len, self.eos_token_ids)
            if seq.status is SequenceStatus.RUNNING:
                self.block_manager.register_resolved_block(seq, index)
            resolved.append((seq, token_id))
            if done:
                if seq.status is SequenceStatus.RUNNING:
                    self.running.remove(seq)
                else:  # preempted after its step was launched: its token still counts
                    self.waiting.remove(seq)
                self._finish(seq)
        return resolved

    def _preempt(self, seq: Sequence) -> None:
        self.num_preemptions += 1
        self.running.remove(seq)
        self.block_manager.deallocate(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def _restart(self, seq: Sequence) -> None:
        """Recompute a sequence from its tokens with its rope counted from its present length (transformers' Phi-3
        drops its cache as its sequences pass the long-rope switch): its blocks go, it waits first in line."""
        self.running.remove(seq)
        self.block_manager.deallocate(seq)
        seq.rope_base_len = seq.num_tokens
        seq.cache_salt = self.rope_length_rule.cache_salt(seq.rope_base_len)
        seq.block_hashes = []  # keyed by the old salt
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def _finish(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.FINISHED
        self.block_manager.deallocate(seq)
        del self.requests[seq.request_id]
