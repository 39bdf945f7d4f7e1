"""Batched token choice: penalties, min_tokens, logit bias, grammar masks, temperature, top-k/top-p/min-p/typical,
seeds, logprobs.

One `.tolist()` of the chosen ids is the only host sync (plus one for logprobs when a row asks for them);
`choose` stops before it, so async scheduling can read the ids a step later. Small per-row parameter tensors
go to the GPU from pinned memory: a copy from pageable memory would wait for the queued forward.
Sampling uses the exponential race `argmax(probs / Exponential(1))`: it needs no multinomial, and a seeded
row draws its noise from its own generator, so its tokens do not depend on what else is in the batch.
"""

from __future__ import annotations

from collections.abc import Sequence as SequenceOf
from dataclasses import dataclass

import numpy as np
import torch

from model_handler.engine_protocol import TokenLogprob
from model_handler.grammar_bitmask import apply_grammar_bitmask
from model_handler.host_to_device import to_device
from model_handler.logits_processors import apply_logit_bias, apply_min_p, apply_typical_p
from model_handler.sequence import Sequence


@dataclass(slots=True)
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprob | None] | None = None
    """Per row, when any row asked for logprobs; None for the rows that did not."""


def _token_counts(rows: list[list[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    """How often each token occurs in each row: [num_rows, vocab_size] float32."""
    width = max((len(r) for r in rows), default=0)
    if width == 0:
        return torch.zeros(len(rows), vocab_size, device=device)
    padded = [r + [vocab_size] * (width - len(r)) for r in rows]  # vocab_size is a spill column for padding
    ids = to_device(torch.tensor(padded, dtype=torch.int64), device)  # [N, width]
    counts = torch.zeros(len(rows), vocab_size + 1, device=device)  # [N, V + 1]
    counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=counts.dtype))
    return counts[:, :vocab_size]


def _argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """Index of each row's largest value (the first on ties): [N, V] -> [N] int64. On CPU numpy's vectorised
    argmax is much faster than torch's."""
    if x.device.type == "cpu" and x.dtype == torch.float32:
        return torch.from_numpy(x.detach().numpy().argmax(axis=-1))
    return x.argmax(dim=-1)


NUCLEUS_CANDIDATES = 64
"""Tokens per row that top-p looks at before it sorts the whole row."""


def _sorted_descending(x: torch.Tensor) -> torch.Tensor:
    """Values only, each row descending; numpy's sort is faster than torch's on CPU."""
    if x.device.type == "cpu":
        return torch.from_numpy(np.ascontiguousarray(np.sort(x.numpy(), axis=-1)[:, ::-1]))
    return x.sort(dim=-1, descending=True).values


def _top_k_top_p_by_sort(logits: torch.Tensor, params: list) -> torch.Tensor:
    """Top-k then top-p with one sort of every row: no host sync, the GPU path."""
    num_rows, vocab_size = logits.shape
    device = logits.device
    top_k = to_device(torch.tensor([p.top_k if p.top_k > 0 else vocab_size for p in params]), device)  # [N]
    top_p = to_device(torch.tensor([p.top_p for p in params], dtype=logits.dtype), device)  # [N]
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # [N, V]
    rank = torch.arange(vocab_size, device=device)[None, :]  # [1, V]
    drop = rank >= top_k[:, None]  # [N, V]
    probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)  # [N, V]
    # Keep the smallest head whose mass reaches top_p: drop a token once the mass before it does.
    drop |= (probs.cumsum(dim=-1) - probs) >= top_p[:, None]
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def _nucleus_threshold(
    best: torch.Tensor, log_norm: torch.Tensor, top_p: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """From each row's best logits (descending, [N, C]) and log normaliser: the smallest logit of the smallest
    head whose mass reaches top_p, and whether that head ends before the C-th value (if not, and the row has
    more tokens, the head may be wider)."""
    probs = (best - log_norm).exp()  # [N, C]
    keep = (probs.cumsum(dim=-1) - probs) < top_p  # [N, C]: the mass before the token is short of top_p
    keep[:, 0] = True
    threshold = best.masked_fill(~keep, float("inf")).amin(dim=-1, keepdim=True)  # [N, 1]
    return threshold, ~keep[:, -1:]


class Sampler:
    def __init__(self, device: torch.device | str = "cpu", seed: int = 0) -> None:
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)
        """Noise for rows without a seed of their own (SEED makes a whole run repeatable)."""

    def __call__(self, logits: torch.Tensor, seqs: SequenceOf[Sequence]) -> SamplerOutput:
        """Choose one token per row of `logits` [num_seqs, vocab] for the matching sequence."""
        chosen = self.choose(logits, seqs)
        params = [s.sampling_params for s in seqs]
        if not any(p.logprobs is not None for p in params):
            return SamplerOutput(chosen.tolist())
        return self._with_logprobs(logits, chosen, params)

    def choose(self, logits: torch.Tensor, seqs: SequenceOf[Sequence]) -> torch.Tensor:
        """The chosen token ids [num_seqs] int64, left on the logits' device (no host sync)."""
        params = [s.sampling_params for s in seqs]
        # A constrained row's grammar holds back its stop tokens itself (apply_grammar_bitmask), as far as the
        # grammar lets the output go on.
        suppress = [
            (i, t)
            for i, s in enumerate(seqs)
            if s.num_output_tokens < params[i].min_tokens and s.grammar is None
            for t in s.stop_token_ids
        ]
        has_penalty = any(
            p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0 for p in params
        )
        has_bias = any(p.logit_bias for p in params)
        has_grammar = any(s.grammar is not None for s in seqs)
        if not suppress and not has_penalty and not has_bias and not has_grammar and all(p.is_greedy for p in params):
            return _argmax_rows(logits)  # the common greedy path: one op

        logits = logits.float().clone()  # [N, V]
        if suppress:
            rows, cols = (to_device(torch.tensor(ix), logits.device) for ix in zip(*suppress))
            logits[rows, cols] = float("-inf")
        if has_penalty:
            logits = self._apply_penalties(logits, seqs)
        if has_bias:
            apply_logit_bias(logits, params)
        if has_grammar:
            apply_grammar_bitmask(logits, seqs)  # last before sampling: after penalties and logit bias
        chosen = _argmax_rows(logits)  # [N], greedy rows keep this
        sample_rows = [i for i, p in enumerate(params) if not p.is_greedy]
        if sample_rows:
            sampled = self._sample(logits, seqs, sample_rows)  # [N]
            is_sampled = torch.zeros(len(params), dtype=torch.bool)
            is_sampled[sample_rows] = True
            chosen = torch.where(to_device(is_sampled, logits.device), sampled, chosen)
        return chosen

    def _apply_penalties(self, logits: torch.Tensor, seqs: SequenceOf[Sequence]) -> torch.Tensor:
        num_rows, vocab_size = logits.shape
        params = [s.sampling_params for s in seqs]
        device = logits.device
        out_counts = _token_counts([s.output_token_ids for s in seqs], vocab_size, device)  # [N, V]
        rep = [p.repetition_penalty for p in params]
        if any(r != 1.0 for r in rep):
            # CTRL/HF: the penalty covers prompt and output; positive logits shrink, negative ones grow.
            prompt_counts = _token_counts(
                [s.prompt_token_ids if p.repetition_penalty != 1.0 else [] for s, p in zip(seqs, params)],
                vocab_size,
                device,
            )
            seen = (prompt_counts + out_counts) > 0  # [N, V]
            penalty = to_device(torch.tensor(rep, dtype=logits.dtype), device)[:, None].expand_as(logits)  # [N, V]
            penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
            logits = torch.where(seen, penalized, logits)
        freq = to_device(torch.tensor([p.frequency_penalty for p in params], dtype=logits.dtype), device)  # [N]
        pres = to_device(torch.tensor([p.presence_penalty for p in params], dtype=logits.dtype), device)  # [N]
        return logits - freq[:, None] * out_counts - pres[:, None] * (out_counts > 0).to(logits.dtype)

    def _sample(self, logits: torch.Tensor, seqs: SequenceOf[Sequence], rows: list[int]) -> torch.Tensor:
        """Temperature, top-k, top-p, min-p, typical, then the exponential race; returns a token per row (greedy
        rows unused)."""
        params = [s.sampling_params for s in seqs]
        device = logits.device
        temps = torch.tensor([p.temperature if p.temperature > 0 else 1.0 for p in params], dtype=logits.dtype)
        logits = logits / to_device(temps, device)[:, None]  # [N, V]
        if any(p.top_k > 0 or p.top_p < 1.0 for p in params):
            logits = self._top_k_top_p(logits, params)
        if any(p.min_p > 0.0 for p in params):
            logits = apply_min_p(logits, params)
        if any(p.typical_p < 1.0 for p in params):
            logits = apply_typical_p(logits, params)
        probs = torch.softmax(logits, dim=-1)  # [N, V]
        # Exponential(1) noise as -log(U): the same distribution as exponential_(), cheaper on CPU.
        noise = torch.empty_like(probs)  # [N, V]
        seeded = [i for i in rows if params[i].seed is not None]
        if len(seeded) < len(rows):
            noise.uniform_(generator=self.generator)
        for i in seeded:
            seq = seqs[i]
            if seq.generator is None:
                seq.generator = torch.Generator(device=device)
                seq.generator.manual_seed(params[i].seed)
            noise[i].uniform_(generator=seq.generator)  # the row's own stream: batch-independent
        noise.log_().neg_()
        return _argmax_rows(probs / noise)

    @staticmethod
    def _top_k_top_p(logits: torch.Tensor, params: list) -> torch.Tensor:
        """Mask the logits outside each row's top-k, then outside its top-p nucleus.

        On CPU both cut-offs come from one `topk` of NUCLEUS_CANDIDATES (or the largest k) values per row,
        far cheaper than sorting the vocabulary; only rows whose nucleus is wider than that (flat
        distributions) sort their whole row. A cut keeps every token tied at it. The GPU sorts (no sync).
        """
        device = logits.device
        if device.type != "cpu":
            return _top_k_top_p_by_sort(logits, params)
        vocab_size = logits.shape[1]
        top_ks = [p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params]  # vocab_size: no cut
        k_t = torch.tensor(top_ks).to(device)[:, None]  # [N, 1]
        top_p = [p.top_p for p in params]
        p_t = torch.tensor(top_p, dtype=logits.dtype).to(device)[:, None]  # [N, 1]
        num_candidates = min(vocab_size, max([k for k in top_ks if k < vocab_size] + [NUCLEUS_CANDIDATES]))
        best = logits.topk(num_candidates, dim=-1).values  # [N, C], descending
        if any(k < vocab_size for k in top_ks):
            kth = best.gather(1, (k_t - 1).clamp(max=num_candidates - 1))  # [N, 1]
            logits = logits.masked_fill((logits < kth) & (k_t < vocab_size), float("-inf"))
            rank = torch.arange(num_candidates, device=device)[None, :]  # [1, C]
            best = best.masked_fill(rank >= k_t, float("-inf"))
        if all(p >= 1.0 for p in top_p):
            return logits
        log_norm = torch.logsumexp(logits, dim=-1, keepdim=True)  # [N, 1]
        threshold, ends_early = _nucleus_threshold(best, log_norm, p_t)  # [N, 1] each
        wide = ((p_t < 1.0) & ~ends_early & (k_t > num_candidates))[:, 0].nonzero()[:, 0].tolist()
        if wide:  # the nucleus reaches past the candidates: sort those rows whole
            rows = torch.tensor(wide, device=device)
            threshold[rows] = _nucleus_threshold(_sorted_descending(logits[rows]), log_norm[rows], p_t[rows])[0]
        return logits.masked_fill((logits < threshold) & (p_t < 1.0), float("-inf"))

    @staticmethod
    def _with_logprobs(raw: torch.Tensor, chosen: torch.Tensor, params: list) -> SamplerOutput:
        """Logprobs of the model's distribution (before penalties and temperature), as OpenAI reports them."""
        rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        rows_t = torch.tensor(rows).to(raw.device)
        logprobs = torch.log_softmax(raw[rows_t].float(), dim=-1)  # [R, V]
        chosen_lp = logprobs.gather(1, chosen[rows_t][:, None])[:, 0]  # [R]
        k_max = max(params[i].logprobs for i in rows)
        top_lp, top_ids = logprobs.topk(k_max, dim=-1)  # [R, k_max]; k_max may be 0
        chosen_list, chosen_lp, top_lp, top_ids = (
            chosen.tolist(),
            chosen_lp.tolist(),
            top_lp.tolist(),
            top_ids.tolist(),
        )
        result: list[TokenLogprob | None] = [None] * len(params)
        for j, i in enumerate(rows):
            k = params[i].logprobs
            result[i] = TokenLogprob(chosen_list[i], chosen_lp[j], list(zip(top_ids[j][:k], top_lp[j][:k])))
        return SamplerOutput(chosen_list, result)


def warm_up(logits: torch.Tensor) -> None:
    """Sample every row of `logits` the costliest way (top-k/top-p sorts and penalty counts over the whole
    vocabulary), so the engine sizes its KV cache with the sampler's temporaries counted."""
    from model_handler.engine_protocol import EngineRequest
    from model_handler.sampling_params import SamplingParams

    params = SamplingParams(temperature=1.0, top_k=50, top_p=0.9, repetition_penalty=1.1, max_tokens=1)
    rows = [Sequence(EngineRequest(f"warmup-{i}", [0], params)) for i in range(logits.shape[0])]
    Sampler(logits.device)(logits, rows)
