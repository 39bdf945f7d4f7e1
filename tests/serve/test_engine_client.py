"""Outputs that queued up while a request's greenlet waited arrive merged: nothing of either may be lost."""

from __future__ import annotations

import dataclasses

from model_handler.engine_protocol import FinishReason, RequestOutput, TokenLogprob
from serve.engine_client import _can_merge, _merged


def _lp(token_id: int) -> TokenLogprob:
    return TokenLogprob(token_id, -0.5 * token_id, [(token_id, -0.5 * token_id)])


def test_merging_keeps_every_field_of_both_outputs():
    first = RequestOutput(
        "r",
        [5, 6],
        new_logprobs=[_lp(5), _lp(6)],
        num_prompt_tokens=4,
        num_cached_tokens=2,
        prompt_logprobs=[_lp(1), _lp(2), _lp(3)],
    )
    second = RequestOutput(
        "r", [7], finish_reason=FinishReason.LENGTH, new_logprobs=[_lp(7)], failure_message="", prompt_logprobs=None
    )
    assert _can_merge(first, second)
    merged = _merged(first, second)
    expected = {
        "request_id": "r",
        "new_token_ids": [5, 6, 7],
        "finish_reason": FinishReason.LENGTH,
        "new_logprobs": [_lp(5), _lp(6), _lp(7)],
        "num_prompt_tokens": 4,
        "num_cached_tokens": 2,
        "failure_message": "",
        "prompt_logprobs": [_lp(1), _lp(2), _lp(3)],
    }
    # A field added to RequestOutput must be merged on purpose (this list fails until it is named here).
    assert {f.name for f in dataclasses.fields(RequestOutput)} == set(expected)
    assert {name: getattr(merged, name) for name in expected} == expected
    assert merged.finished


def test_prompt_logprobs_from_either_side_survive():
    late = _merged(RequestOutput("r", []), RequestOutput("r", [9], prompt_logprobs=[_lp(1)]))
    assert late.prompt_logprobs == [_lp(1)]
    assert _merged(RequestOutput("r", [1]), RequestOutput("r", [2])).prompt_logprobs is None
