"""Logit bias, min-p and typical sampling: against transformers' own warpers, and through the Sampler."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import MinPLogitsWarper, TypicalLogitsWarper

import model_handler.sampler as sampler_module
from model_handler.logits_processors import apply_logit_bias, apply_min_p, apply_typical_p
from model_handler.sampler import Sampler
from model_handler.sampling_params import SamplingParams
from tests.model_handler.engine_factories import create_sequence

V = 48


def random_logits(num_rows: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(num_rows, V, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize("mass", [0.2, 0.5, 0.9, 0.99])
def test_typical_p_equals_transformers_warper(mass):
    logits = random_logits(8, seed=3) * torch.linspace(0.2, 3.0, 8)[:, None]  # flat to peaked rows
    params = [SamplingParams(typical_p=mass) for _ in range(8)]
    expected = TypicalLogitsWarper(mass=mass)(None, logits.clone())
    assert torch.equal(apply_typical_p(logits, params), expected)


def test_typical_p_touches_only_the_rows_that_ask():
    logits = random_logits(3, seed=4)
    params = [SamplingParams(typical_p=0.3), SamplingParams(), SamplingParams(typical_p=0.8)]
    out = apply_typical_p(logits, params)
    assert torch.equal(out[1], logits[1])
    assert torch.equal(out[0], TypicalLogitsWarper(mass=0.3)(None, logits[:1].clone())[0])
    assert torch.equal(out[2], TypicalLogitsWarper(mass=0.8)(None, logits[2:].clone())[0])
    assert 0 < out[0].isfinite().sum() < V  # it really cut


def test_typical_p_after_another_cut_ignores_the_dropped_tokens():
    logits = random_logits(2, seed=5)
    logits[:, :10] = float("-inf")  # as top-k would leave them
    params = [SamplingParams(typical_p=0.6)] * 2
    assert torch.equal(apply_typical_p(logits, params), TypicalLogitsWarper(mass=0.6)(None, logits.clone()))


@pytest.mark.parametrize("min_p", [0.05, 0.3, 0.9])
def test_min_p_equals_transformers_warper(min_p):
    logits = random_logits(6, seed=6)
    params = [SamplingParams(min_p=min_p) for _ in range(6)]
    expected = MinPLogitsWarper(min_p=min_p)(None, logits.clone())
    assert torch.equal(apply_min_p(logits, params), expected)


def test_min_p_zero_leaves_the_row_alone():
    logits = random_logits(2, seed=7)
    out = apply_min_p(logits, [SamplingParams(min_p=0.0), SamplingParams(min_p=0.5)])
    assert torch.equal(out[0], logits[0]) and not torch.equal(out[1], logits[1])


def test_logit_bias_adds_to_the_named_ids_of_each_row():
    logits = random_logits(3, seed=8)
    params = [SamplingParams(logit_bias={2: 5.0, 7: -100.0}), SamplingParams(), SamplingParams(logit_bias={2: 1.5})]
    biased = logits.clone()
    apply_logit_bias(biased, params)
    expected = logits.clone()
    expected[0, 2] += 5.0
    expected[0, 7] -= 100.0
    expected[2, 2] += 1.5
    assert torch.equal(biased, expected)


def test_logit_bias_steers_greedy_rows_and_leaves_unbiased_ones():
    logits = random_logits(3, seed=9)
    best = logits.argmax(-1)
    forced = int((best[0] + 1) % V)
    rows = [
        create_sequence([1], temperature=0.0, logit_bias={forced: 100.0}),
        create_sequence([1], temperature=0.0),
        create_sequence([1], temperature=0.0, logit_bias={int(best[2]): -100.0}),
    ]
    out = Sampler()(logits, rows)
    second_best = int(logits[2].topk(2).indices[1])
    assert out.token_ids == [forced, int(best[1]), second_best]


def test_logit_bias_reaches_sampled_rows():
    logits = torch.zeros(200, V)  # uniform: any token is likely until biased
    out = Sampler(seed=1)(logits, [create_sequence([1], temperature=1.0, logit_bias={5: 100.0}) for _ in range(200)])
    assert set(out.token_ids) == {5}


def test_unbiased_greedy_batch_keeps_the_one_op_path(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the greedy fast path ran a transform")

    for name in ("apply_logit_bias", "apply_min_p", "apply_typical_p"):
        monkeypatch.setattr(sampler_module, name, fail)
    logits = random_logits(4, seed=10)
    rows = [create_sequence([1], temperature=0.0, min_p=0.5, typical_p=0.5) for _ in range(4)]
    assert Sampler()(logits, rows).token_ids == logits.argmax(-1).tolist()


def test_sampled_tokens_stay_inside_the_min_p_and_typical_sets():
    logits = random_logits(1, seed=11).repeat(600, 1)  # [600, V]
    for field, value, warper in (("min_p", 0.2, MinPLogitsWarper(0.2)), ("typical_p", 0.5, TypicalLogitsWarper(0.5))):
        allowed = set(warper(None, logits[:1].clone())[0].isfinite().nonzero()[:, 0].tolist())
        rows = [create_sequence([1], temperature=1.0, **{field: value}) for _ in range(600)]
        drawn = set(Sampler(seed=2)(logits, rows).token_ids)
        assert drawn == allowed, field  # every kept token drawn at least once, nothing else
