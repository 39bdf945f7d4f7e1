"""Sequence: the engine's mutable state of one request (tokens, KV blocks, progress, stop checks)."""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

from model_handler.engine_protocol import EngineRequest, FinishReason, TokenLogprob
from model_handler.sampling_params import SamplingParams

if TYPE_CHECKING:
    import torch

    from model_handler.grammar_matcher import RequestGrammar


PLACEHOLDER_TOKEN = -1
"""Stands for a token sampled by a step still running on the device (async scheduling) until it is read."""


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """Prompt plus generated tokens; `num_computed_tokens` of them have their KV in the cache.

    After a preemption the KV is dropped and recomputed from `token_ids` (prompt and output so far),
    so `num_computed_tokens` goes back to 0 while the output tokens already sent stay.
    """

    __slots__ = (
        "request_id",
        "token_ids",
        "num_prompt_tokens",
        "sampling_params",
        "arrival_time",
        "status",
        "finish_reason",
        "num_computed_tokens",
        "num_cached_tokens",
        "block_table",
        "block_hashes",
        "generator",
        "stop_token_ids",
        "num_pending_tokens",
        "grammar",
        "failure_message",
        "prompt_logprobs",
        "num_prompt_logprobs_sent",
        "cache_salt",
        "num_dropped_blocks",
        "rope_base_len",
    )

    def __init__(self, request: EngineRequest, eos_token_ids: tuple[int, ...] = (), cache_salt: int = 0) -> None:
        params = request.sampling_params
        self.request_id = request.request_id
        self.token_ids: list[int] = list(request.prompt_token_ids)
        self.num_prompt_tokens = len(self.token_ids)
        self.sampling_params: SamplingParams = params
        self.arrival_time = request.arrival_time
        self.status = SequenceStatus.WAITING
        self.finish_reason: FinishReason | None = None
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0
        """Prompt tokens whose KV came from the prefix cache on the first admission (reported to the client)."""
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []
        """Chained hash of each full block of `token_ids`, filled lazily by the block manager."""
        self.generator: torch.Generator | None = None
        """Per-request RNG for seeded sampling, created by the sampler on first use."""
        # EOS ends a request unless ignore_eos; explicit stop ids always do.
        self.stop_token_ids: frozenset[int] = frozenset(() if params.ignore_eos else eos_token_ids) | frozenset(
            params.stop_token_ids
        )
        self.num_pending_tokens = 0
        """Trailing PLACEHOLDER_TOKENs in `token_ids` whose values the device has not handed back yet."""
        self.grammar: RequestGrammar | None = None
        """The matcher of the request's constraint, set when its grammar has compiled; it advances with every
        appended token (constrained requests never run ahead with placeholders)."""
        self.failure_message = ""
        """Why, when `finish_reason` is ERROR."""
        self.prompt_logprobs: list[TokenLogprob] = []
        """Logprobs of prompt tokens 1, 2, ... as their rows are computed (requests with `prompt_logprobs`)."""
        self.num_prompt_logprobs_sent = 0
        self.cache_salt = cache_salt
        """Starts the chain of its block hashes: what besides the tokens decides their KV (a long prompt under a
        length-dependent rope); only blocks of equal salt are shared."""
        self.num_dropped_blocks = 0
        """Leading entries of `block_table` freed because no layer's window reaches them any more (now -1)."""
        self.rope_base_len = self.num_prompt_tokens
        """A length-dependent rope rotates token p as for a sequence of max(p + 1, rope_base_len) tokens: the
        prompt's length, or the length at a restart (model_layout.RopeLengthRule)."""

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def needs_prompt_logits(self) -> bool:
        """It asked for prompt logprobs and some prompt tokens (all but the first have one) still lack theirs."""
        return (
            self.sampling_params.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt_tokens - 1
        )

    def take_prompt_logprobs(self) -> list[TokenLogprob] | None:
        """The prompt logprobs not sent yet (None when the request did not ask or none are new)."""
        if self.sampling_params.prompt_logprobs is None or self.num_prompt_logprobs_sent == len(self.prompt_logprobs):
            return None
        new = self.prompt_logprobs[self.num_prompt_logprobs_sent :]
        self.num_prompt_logprobs_sent = len(self.prompt_logprobs)
        return new

    def append_token(self, token_id: int, max_model_len: int, eos_token_ids: frozenset[int]) -> bool:
        """Add a sampled token; return True (and set `finish_reason`) when the request is done."""
        self.token_ids.append(token_id)
        if self.grammar is not None and not self.grammar.accept(token_id):
            # The mask makes this unreachable unless a row had no finite logit left to sample from.
            self.finish_reason = FinishReason.ERROR
            self.failure_message = f"token {token_id} was sampled against the request's grammar"
            return True
        return self._check_finish(token_id, self.num_tokens, max_model_len, eos_token_ids)

    def append_placeholder(self) -> None:
        """Hold the place of a token the device is still sampling (see `resolve_placeholder`)."""
        self.token_ids.append(PLACEHOLDER_TOKEN)
        self.num_pending_tokens += 1

    def resolve_placeholder(self, token_id: int, max_model_len: int, eos_token_ids: frozenset[int]) -> bool:
        """Put the sampled token in the oldest placeholder's place; True (with `finish_reason`) when that
        token ends the request, in which case any later placeholder (a step run in vain) is dropped."""
        index = self.num_tokens - self.num_pending_tokens
        self.token_ids[index] = token_id
        self.num_pending_tokens -= 1
        if not self._check_finish(token_id, index + 1, max_model_len, eos_token_ids):
            return False
        del self.token_ids[index + 1 :]
        self.num_pending_tokens = 0
        return True

    def reached_length_limit(self, max_model_len: int) -> bool:
        """No more tokens may follow: max_tokens or the model length is used up."""
        return self.num_output_tokens >= self.sampling_params.max_tokens or self.num_tokens >= max_model_len

    def _check_finish(self, token_id: int, num_tokens: int, max_model_len: int, eos_token_ids: frozenset[int]) -> bool:
        """Whether the token at position num_tokens - 1 ends the request; sets `finish_reason`."""
        params = self.sampling_params
        num_output = num_tokens - self.num_prompt_tokens
        if token_id in self.stop_token_ids and num_output >= params.min_tokens:
            is_eos = token_id in eos_token_ids and not params.ignore_eos
            self.finish_reason = FinishReason.EOS if is_eos else FinishReason.STOP_TOKEN
        elif self.grammar is not None and self.grammar.is_terminated:
            # The grammar accepted one of its stop tokens (the model's EOS ids), which it allows only once the
            # output is complete: an end of text, even before min_tokens or with ignore_eos.
            self.finish_reason = FinishReason.EOS
        elif num_output >= params.max_tokens or num_tokens >= max_model_len:
            self.finish_reason = FinishReason.LENGTH
        return self.finish_reason is not None

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request_id!r}, status={self.status.name}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, blocks={len(self.block_table)})"
        )
