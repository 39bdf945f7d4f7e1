"""Prompt logprobs: a step's prompt rows turned into each prompt token's logprob (and top alternatives).

The model runner returns, for a sequence that asked (`SamplingParams.prompt_logprobs`), the logits of the prompt
positions its chunk scores, just before its sampling row. The logits at position p score prompt token p + 1, so a
prompt of n tokens gets n - 1 logprobs, the first token none (TGI writes null there, OpenAI's echo too).
"""

from __future__ import annotations

import torch

from model_handler.engine_protocol import TokenLogprob
from model_handler.scheduler import SchedulerOutput


def take_prompt_logprobs(out: SchedulerOutput, logits: torch.Tensor) -> torch.Tensor:
    """Record the prompt rows of `logits` [num_rows, vocab] on their sequences; return the sampling rows
    [num_sampling, vocab], in the order of `out.scheduled`."""
    sample_rows: list[int] = []
    prompt_rows: list[int] = []
    target_ids: list[int] = []
    owners: list[tuple] = []  # (sequence, number of its rows), in row order
    row = 0
    for entry in out.scheduled:
        num_rows = entry.num_prompt_logit_rows
        if num_rows:
            first = entry.prompt_logits_start
            prompt_rows.extend(range(row, row + num_rows))
            target_ids.extend(entry.seq.token_ids[first + 1 : first + 1 + num_rows])
            owners.append((entry.seq, num_rows))
            row += num_rows
        if entry.samples:
            sample_rows.append(row)
            row += 1
    if row != logits.shape[0]:
        raise RuntimeError(f"{logits.shape[0]} logit rows for a step that reads {row}")
    device = logits.device
    logprobs = torch.log_softmax(logits[torch.tensor(prompt_rows, device=device)].float(), dim=-1)  # [R, V]
    targets = torch.tensor(target_ids, device=device)[:, None]  # [R, 1]
    chosen = logprobs.gather(1, targets)[:, 0].tolist()  # [R]
    k_max = max(seq.sampling_params.prompt_logprobs for seq, _ in owners)
    top_lp, top_ids = logprobs.topk(k_max, dim=-1)  # [R, k_max]; k_max may be 0
    top_lp, top_ids = top_lp.tolist(), top_ids.tolist()
    start = 0
    for seq, num_rows in owners:
        k = seq.sampling_params.prompt_logprobs
        for j in range(start, start + num_rows):
            top = list(zip(top_ids[j][:k], top_lp[j][:k]))
            seq.prompt_logprobs.append(TokenLogprob(target_ids[j], chosen[j], top))
        start += num_rows
    return logits[torch.tensor(sample_rows, dtype=torch.int64, device=device)]
