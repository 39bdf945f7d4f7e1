"""Sampler: greedy, seeds, top-k/top-p, penalties, min_tokens and logprobs on hand-made logits."""

from __future__ import annotations

import torch

from model_handler.sampler import Sampler, _top_k_top_p_by_sort
from tests.model_handler.engine_factories import EOS, create_sequence

V = 32


def random_logits(num_rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(num_rows, V, generator=torch.Generator().manual_seed(seed)) * 3


def seqs(n: int, **params):
    return [create_sequence([5, 6, 7], **params) for _ in range(n)]


def test_greedy_is_argmax():
    logits = random_logits(6)
    out = Sampler()(logits, seqs(6, temperature=0.0))
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs is None


def test_top_k_one_is_greedy_even_at_temperature_one():
    logits = random_logits(6)
    out = Sampler(seed=3)(logits, seqs(6, temperature=1.0, top_k=1))
    assert out.token_ids == logits.argmax(-1).tolist()


def test_greedy_and_sampled_rows_mix_in_one_batch():
    logits = random_logits(4)
    rows = seqs(2, temperature=0.0) + seqs(2, temperature=5.0, seed=1)
    out = Sampler()(logits, rows)
    assert out.token_ids[:2] == logits[:2].argmax(-1).tolist()


def test_seeded_rows_repeat_and_do_not_depend_on_the_batch():
    steps = [random_logits(1, seed=s)[0] for s in range(20)]

    def draw(batch_extra: int, position: int) -> list[int]:
        sampler = Sampler(seed=batch_extra)  # a different global seed for the unseeded rows
        target = create_sequence([1, 2], temperature=1.5, seed=1234)
        others = seqs(batch_extra, temperature=1.0) + seqs(batch_extra, temperature=0.7, seed=99)
        tokens = []
        for logits in steps:
            rows = others[:position] + [target] + others[position:]
            batch = torch.stack([logits] * len(rows))  # [B, V]
            out = sampler(batch, rows)
            tokens.append(out.token_ids[position])
            target.token_ids.append(out.token_ids[position])
        return tokens

    alone = draw(0, 0)
    assert draw(0, 0) == alone
    assert draw(3, 2) == alone
    assert draw(5, 7) == alone
    assert len(set(alone)) > 3  # really sampled, not greedy


def test_same_seed_same_tokens_different_seed_different_tokens():
    def ten_tokens(seed: int) -> list[int]:
        seq = create_sequence([1], temperature=1.0, seed=seed)
        return [Sampler()(torch.zeros(1, V), [seq]).token_ids[0] for _ in range(10)]

    assert ten_tokens(1) == ten_tokens(1)
    assert len({tuple(ten_tokens(s)) for s in range(4)}) == 4


def test_sampling_follows_the_softmax_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = torch.log(probs)[None].repeat(4000, 1)  # [4000, 4]
    out = Sampler(seed=0)(logits, seqs(4000, temperature=1.0))
    freq = torch.bincount(torch.tensor(out.token_ids), minlength=4).float() / 4000
    assert torch.allclose(freq, probs, atol=0.03)


def test_top_k_only_draws_from_the_k_best():
    logits = random_logits(1, seed=5).repeat(500, 1)  # [500, V]
    out = Sampler(seed=0)(logits, seqs(500, temperature=10.0, top_k=3))
    assert set(out.token_ids) == set(logits[0].topk(3).indices.tolist())


def test_top_p_keeps_the_smallest_head_reaching_p():
    probs = torch.tensor([0.45, 0.3, 0.15, 0.1])
    logits = torch.log(probs)[None].repeat(1000, 1)
    out = Sampler(seed=0)(logits, seqs(1000, temperature=1.0, top_p=0.7))
    assert set(out.token_ids) == {0, 1}  # 0.45 < 0.7 <= 0.75
    out = Sampler(seed=0)(logits, seqs(1000, temperature=1.0, top_p=0.4))
    assert set(out.token_ids) == {0}


def test_frequency_penalty_subtracts_count_times_penalty():
    logits = torch.full((1, V), -5.0)
    logits[0, 3], logits[0, 4] = 2.0, 1.5

    def pick(penalty: float) -> int:
        seq = create_sequence([9, 9], temperature=0.0, frequency_penalty=penalty)
        seq.token_ids += [3, 3]  # two outputs of token 3
        return Sampler()(logits, [seq]).token_ids[0]

    assert pick(0.2) == 3  # 2.0 - 0.4 = 1.6 > 1.5
    assert pick(0.3) == 4  # 2.0 - 0.6 = 1.4 < 1.5


def test_presence_penalty_counts_once():
    logits = torch.full((1, V), -5.0)
    logits[0, 3], logits[0, 4] = 2.0, 1.5
    seq = create_sequence([9], temperature=0.0, presence_penalty=0.4)
    seq.token_ids += [3, 3, 3]
    assert Sampler()(logits, [seq]).token_ids[0] == 3  # 2.0 - 0.4 = 1.6
    seq.sampling_params.presence_penalty = 0.6
    assert Sampler()(logits, [seq]).token_ids[0] == 4  # 1.4


def test_repetition_penalty_covers_the_prompt_and_both_signs():
    logits = torch.full((1, V), -5.0)
    logits[0, 3], logits[0, 4] = 2.0, 1.5
    in_prompt = create_sequence([3], temperature=0.0, repetition_penalty=1.5)  # 2.0 / 1.5 < 1.5
    assert Sampler()(logits, [in_prompt]).token_ids[0] == 4
    negative = torch.full((1, V), -9.0)
    negative[0, 3], negative[0, 4] = -1.0, -1.4
    seen = create_sequence([3], temperature=0.0, repetition_penalty=1.5)  # -1.0 * 1.5 < -1.4
    assert Sampler()(negative, [seen]).token_ids[0] == 4
    unseen = create_sequence([8], temperature=0.0, repetition_penalty=1.5)
    assert Sampler()(negative, [unseen]).token_ids[0] == 3


def test_min_tokens_masks_eos_and_stop_tokens():
    logits = torch.zeros(1, V)
    logits[0, EOS], logits[0, 20], logits[0, 4] = 5.0, 4.0, 3.0
    seq = create_sequence([9], temperature=0.0, min_tokens=2, stop_token_ids=(20,))
    assert Sampler()(logits, [seq]).token_ids[0] == 4
    seq.token_ids += [4, 4]
    assert Sampler()(logits, [seq]).token_ids[0] == EOS
    ignoring = create_sequence([9], temperature=0.0, min_tokens=2, ignore_eos=True)
    assert Sampler()(logits, [ignoring]).token_ids[0] == EOS  # EOS is an ordinary token then


def test_logprobs_equal_log_softmax():
    logits = random_logits(3, seed=11)
    rows = [
        create_sequence([1], temperature=0.0, logprobs=3),
        create_sequence([1], temperature=0.0),
        create_sequence([1], temperature=0.8, seed=5, logprobs=0),
    ]
    out = Sampler()(logits, rows)
    expected = torch.log_softmax(logits, dim=-1)
    first, none, third = out.logprobs
    assert none is None
    assert first.token_id == out.token_ids[0]
    assert abs(first.logprob - expected[0, first.token_id].item()) < 1e-5
    top = expected[0].topk(3)
    assert [t for t, _ in first.top] == top.indices.tolist()
    assert torch.allclose(torch.tensor([lp for _, lp in first.top]), top.values, atol=1e-5)
    assert third.top == [] and abs(third.logprob - expected[2, third.token_id].item()) < 1e-5


def _sorted_top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """The textbook filter (sort, cumulative mass), to check the sort-free one against."""
    out = torch.full_like(logits, float("-inf"))
    for i, row in enumerate(logits):
        order = row.argsort(descending=True)
        keep = order[: top_k[i]] if top_k[i] > 0 else order
        probs = torch.softmax(row[keep], dim=-1)
        mass_before = probs.cumsum(0) - probs
        keep = keep[mass_before < top_p[i]]
        out[i, keep] = row[keep]
    return out


def test_top_k_top_p_mask_matches_sort_and_cumsum_per_row():
    logits = torch.randn(64, 300, generator=torch.Generator().manual_seed(7)) * torch.linspace(0.1, 6, 64)[:, None]
    gen = torch.Generator().manual_seed(8)
    top_k = [int(k) for k in torch.randint(0, 40, (64,), generator=gen)]  # 0 = no top-k, mixed with cut rows
    top_p = [float(p) for p in torch.rand(64, generator=gen).clamp(min=0.05)]
    top_p[::5] = [1.0] * len(top_p[::5])
    params = [s.sampling_params for s in seqs(64, temperature=1.0)]
    for p, k, q in zip(params, top_k, top_p):
        p.top_k, p.top_p = k, q
    expected = _sorted_top_k_top_p(logits, top_k, top_p).isfinite()
    # The CPU filter (top-k candidates, sorting only wide rows) and the GPU one (one sort, run here on CPU).
    for filtered in (Sampler._top_k_top_p(logits.clone(), params), _top_k_top_p_by_sort(logits.clone(), params)):
        assert torch.equal(filtered.isfinite(), expected)
        assert torch.equal(filtered[filtered.isfinite()], logits[filtered.isfinite()])
