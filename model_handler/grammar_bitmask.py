"""The per-step token mask of a batch's constrained rows, the sampler's one grammar call: one bitmask for the
batch, filled on the host for the constrained rows only and applied to their logits in place. A batch with no
constrained row costs nothing here."""

from __future__ import annotations

from collections.abc import Sequence as SequenceOf
from typing import TYPE_CHECKING

import numpy as np
import torch

from model_handler.grammar_compiler import import_xgrammar

if TYPE_CHECKING:
    from model_handler.sequence import Sequence


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
