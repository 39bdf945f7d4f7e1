"""The sampler's per-row logit transforms beyond temperature, top-k and top-p: OpenAI's logit bias, vLLM's min-p
and locally typical sampling (TGI, transformers), one function each.

Each takes the step's logits [num_rows, vocab] float32 and the rows' SamplingParams and touches only the rows
that ask for it; `Sampler` calls them in its fixed order (penalties -> logit bias -> temperature -> top-k/top-p
-> min-p -> typical -> sample).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from model_handler.host_to_device import to_device
from model_handler.sampling_params import SamplingParams


def apply_logit_bias(logits: torch.Tensor, params: Sequence[SamplingParams]) -> None:
    """Add each row's `logit_bias` to its logits, in place (OpenAI: after the penalties, before sampling)."""
    rows, cols, values = [], [], []
    for row, p in enumerate(params):
        for token_id, bias in p.logit_bias.items():
            rows.append(row)
            cols.append(token_id)
            values.append(bias)
    if not rows:
        return
    device = logits.device
    index = (to_device(torch.tensor(rows), device), to_device(torch.tensor(cols), device))
    logits.index_put_(index, to_device(torch.tensor(values, dtype=logits.dtype), device), accumulate=True)


def apply_min_p(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Drop the tokens whose probability is below min_p x the row's most likely token's (vLLM's min-p, applied
    to the tempered distribution); rows with min_p 0 are unchanged."""
    min_p = to_device(torch.tensor([p.min_p for p in params], dtype=logits.dtype), logits.device)[:, None]  # [N, 1]
    probs = torch.softmax(logits, dim=-1)  # [N, V]
    return logits.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), float("-inf"))


def apply_typical_p(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Locally typical sampling, as transformers' TypicalLogitsWarper and TGI define it: rank tokens by how far
    their information (-log p) is from the distribution's entropy and keep the closest ones until their mass
    reaches typical_p (at least one token); rows with typical_p 1.0 are unchanged."""
    rows = [i for i, p in enumerate(params) if p.typical_p < 1.0]
    if not rows:
        return logits
    device = logits.device
    rows_t = to_device(torch.tensor(rows), device)
    mass = to_device(torch.tensor([params[i].typical_p for i in rows], dtype=logits.dtype), device)[:, None]  # [R, 1]
    sub = logits[rows_t]  # [R, V]
    log_probs = torch.log_softmax(sub, dim=-1)  # [R, V]
    probs = log_probs.exp()
    entropy = -(log_probs * probs).nansum(dim=-1, keepdim=True)  # [R, 1]; masked tokens give 0 * -inf = nan
    distance = (-log_probs - entropy).abs()  # [R, V]
    sorted_distance, order = distance.sort(dim=-1)  # [R, V], closest to typical first
    cumulative = probs.gather(-1, order).cumsum(dim=-1)  # [R, V]
    last = (cumulative < mass).sum(dim=-1, keepdim=True).clamp(max=sub.shape[-1] - 1)  # [R, 1]
    drop_sorted = sorted_distance > sorted_distance.gather(-1, last)  # [R, V]
    drop_sorted[:, 0] = False  # always keep one token
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # [R, V], back in vocabulary order
    out = logits.clone()
    out[rows_t] = sub.masked_fill(drop, float("-inf"))
    return out
