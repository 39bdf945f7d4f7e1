"""Per-request grammar state and the per-step token mask of the constrained rows of a batch.

Each constrained sequence holds a `RequestGrammar` (an xgrammar matcher) that advances with every token appended
to it, so preemption and recompute, which keep the tokens, keep it where it is. `apply_grammar_bitmask` is the
sampler's one call: a batch with no constrained row costs nothing there.
"""

from __future__ import annotations

from collections.abc import Sequence as SequenceOf
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from model_handler.grammar_compiler import import_xgrammar

if TYPE_CHECKING:
    from model_handler.sequence import Sequence


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


def _keep_going(words: np.ndarray, stop_token_ids: frozenset[int]) -> None:
    """min_tokens: drop the stop tokens from one row's allowed set, unless the grammar allows nothing else
    (it is complete and cannot continue, so it ends even before min_tokens)."""
    bits = words.view(np.uint32)
    kept = bits.copy()
    for token_id in stop_token_ids:
        if token_id >> 5 < len(kept):
            kept[token_id >> 5] &= ~np.uint32(1 << (token_id & 31))
    if kept.any():
        bits[:] = kept


def apply_grammar_bitmask(logits: torch.Tensor, seqs: SequenceOf[Sequence]) -> None:
    """Set to -inf, in place, each constrained row's logits of tokens its grammar forbids next (`logits`
    [num_seqs, vocab], row i for seqs[i]); rows without a grammar are left untouched, bit for bit."""
    rows = [i for i, seq in enumerate(seqs) if seq.grammar is not None]
    if not rows:
        return
    xgr = import_xgrammar()
    num_rows, vocab_size = logits.shape
    on_cuda = logits.device.type == "cuda"
    # Only the constrained rows are filled and read (the apply takes `indices`), so the rest stays unset.
    bitmask = torch.empty((num_rows, (vocab_size + 31) // 32), dtype=torch.int32, pin_memory=on_cuda)  # [N, W]
    for i in rows:
        seq = seqs[i]
        seq.grammar.fill(bitmask, i)
        if seq.num_output_tokens < seq.sampling_params.min_tokens:
            _keep_going(bitmask[i].numpy(), seq.stop_token_ids | seq.grammar.stop_token_ids)
    device_bitmask = bitmask.to(logits.device, non_blocking=True) if on_cuda else bitmask
    xgr.apply_token_bitmask_inplace(logits, device_bitmask, vocab_size=vocab_size, indices=rows)
