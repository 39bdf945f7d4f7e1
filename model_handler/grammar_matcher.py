"""Per-request grammar state: each constrained sequence holds a `RequestGrammar` (an xgrammar matcher) that
advances with every token appended to it, so preemption and recompute, which keep the tokens, keep it where it is.
"""

from __future__ import annotations

from typing import Any

import torch

from model_handler.grammar_compiler import import_xgrammar


class RequestGrammar:
    """Where one request's output stands in its grammar. Stop tokens are the model's EOS ids: the matcher
    allows them exactly when the grammar can end, and accepting one terminates it."""

    __slots__ = ("_matcher", "stop_token_ids")

    def __init__(self, compiled: Any) -> None:
        xgr = import_xgrammar()
        self._matcher = xgr.GrammarMatcher(compiled, max_rollback_tokens=0)
        self.stop_token_ids: frozenset[int] = frozenset(self._matcher.stop_token_ids)

    def accept(self, token_id: int) -> bool:
        """Advance past a sampled token; False when the grammar does not allow it (the matcher is unchanged)."""
        return self._matcher.accept_token(token_id)

    @property
    def is_terminated(self) -> bool:
        """A stop token ended the grammar: the request is complete."""
        return self._matcher.is_terminated()

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the tokens allowed next into `bitmask[row]` (one bit per token id, int32 words, on the host)."""
        self._matcher.fill_next_token_bitmask(bitmask, row)
