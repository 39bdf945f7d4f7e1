"""Constrained decoding end to end on the random-weight test model: every output parses and validates, a finished
grammar ends its request, JSON whitespace stays bounded, a padded LM head, and an image without xgrammar."""

from __future__ import annotations

import json
import re
import shutil
import sys

import jsonschema
import pytest

from model_handler import grammar_compiler as compiler_module
from model_handler.constraints import Constraint, ConstraintKind
from model_handler.engine_protocol import EngineRequest, FinishReason
from model_handler.grammar_compiler import MAX_JSON_WHITESPACE
from model_handler.sampling_params import SamplingParams
from tests.model_handler.engine_factories import create_engine, random_prompt, run_to_completion, tokens_of

EOS = 2
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["red", "green"]}, "maxItems": 3},
        "pet": {"type": "object", "properties": {"kind": {"enum": ["cat", "dog"]}}, "required": ["kind"]},
    },
    "required": ["name", "age", "pet"],
}
EMAIL = r"[a-z]{2,10}@[a-z]{2,8}\.(com|org)"
TOOL_CALL = re.compile(r"(?s)(.*)<tool_call>(.*)</tool_call>")
# A few words of free text, then the model must open a call: the trigger path, whatever random weights prefer.
CALL_AFTER_TEXT = {
    "type": "structural_tag",
    "format": {
        "type": "sequence",
        "elements": [
            {"type": "any_text", "max_tokens": 6},
            {
                "type": "triggered_tags",
                "triggers": ["<tool_call>"],
                "tags": [
                    {
                        "type": "tag",
                        "begin": "<tool_call>",
                        "content": {"type": "json_schema", "json_schema": PERSON},
                        "end": "</tool_call>",
                    }
                ],
                "at_least_one": True,
                "stop_after_first": True,
            },
        ],
    },
}


@pytest.fixture(scope="module")
def engine(test_model_dir):
    return create_engine(test_model_dir)


def constrained(request_id: str, constraint: Constraint, seed: int, max_tokens: int = 300, **params) -> EngineRequest:
    """Greedy for seed 0, sampled at temperature 1 otherwise; a random prompt per seed."""
    sampling = SamplingParams(
        max_tokens=max_tokens, temperature=0.0 if seed == 0 else 1.0, seed=seed, constraint=constraint, **params
    )
    return EngineRequest(request_id, random_prompt(6, seed=seed), sampling)


def run_batch(engine, constraint: Constraint, num: int = 6, **params) -> list[list]:
    """`num` constrained requests and two unconstrained ones in one batch; the constrained ones' outputs."""
    for seed in range(num):
        engine.add_request(constrained(f"c{seed}", constraint, seed, **params))
    for seed in range(2):
        engine.add_request(
            EngineRequest(f"free{seed}", random_prompt(5, seed=50 + seed), SamplingParams(max_tokens=20))
        )
    results = run_to_completion(engine)
    assert all(len(tokens_of(results[f"free{seed}"])) >= 1 for seed in range(2))
    return [results[f"c{seed}"] for seed in range(num)]


def text_of(outputs: list, tokenizer) -> str:
    """The generated text, without the EOS that ended it."""
    token_ids = tokens_of(outputs)
    if outputs[-1].finish_reason is FinishReason.EOS:
        assert token_ids[-1] == EOS
        token_ids = token_ids[:-1]
    return tokenizer.decode(token_ids)


def test_json_schema_outputs_validate(engine, test_tokenizer):
    for outputs in run_batch(engine, Constraint(ConstraintKind.JSON_SCHEMA, json.dumps(PERSON))):
        assert outputs[-1].finish_reason is FinishReason.EOS
        jsonschema.validate(json.loads(text_of(outputs, test_tokenizer)), PERSON)


def test_json_object_outputs_are_objects(engine, test_tokenizer):
    """Any object: strings are unbounded, so a random model may run out of tokens; those that end parse."""
    batch = run_batch(engine, Constraint(ConstraintKind.JSON_OBJECT), num=8, max_tokens=400)
    finished = [outputs for outputs in batch if outputs[-1].finish_reason is FinishReason.EOS]
    assert len(finished) >= 4
    for outputs in finished:
        assert isinstance(json.loads(text_of(outputs, test_tokenizer)), dict)


def test_regex_outputs_match_whole(engine, test_tokenizer):
    for outputs in run_batch(engine, Constraint(ConstraintKind.REGEX, EMAIL)):
        assert outputs[-1].finish_reason is FinishReason.EOS
        assert re.fullmatch(EMAIL, text_of(outputs, test_tokenizer))


def test_structural_tag_outputs_hold_a_valid_call_after_the_text(engine, test_tokenizer):
    for outputs in run_batch(engine, Constraint(ConstraintKind.STRUCTURAL_TAG, json.dumps(CALL_AFTER_TEXT))):
        assert outputs[-1].finish_reason is FinishReason.EOS
        match = TOOL_CALL.fullmatch(text_of(outputs, test_tokenizer))
        assert match and "<tool_call>" not in match[1]
        jsonschema.validate(json.loads(match[2]), PERSON)


def test_a_finished_grammar_ends_the_request_even_against_min_tokens_and_ignore_eos(engine, test_tokenizer):
    answer = Constraint(ConstraintKind.REGEX, "(yes|no)")
    for seed in range(3):
        engine.add_request(constrained(f"yn{seed}", answer, seed, max_tokens=50, min_tokens=40, ignore_eos=True))
    results = run_to_completion(engine)
    for seed in range(3):
        outputs = results[f"yn{seed}"]
        assert outputs[-1].finish_reason is FinishReason.EOS and tokens_of(outputs)[-1] == EOS
        assert text_of(outputs, test_tokenizer) in ("yes", "no")
        assert len(tokens_of(outputs)) <= 4


def longest_whitespace_run(text: str) -> int:
    return max((len(run) for run in re.findall(r"[ \t\n\r]+", text)), default=0)


def test_json_whitespace_stays_bounded(engine, test_tokenizer, test_model_dir, monkeypatch):
    schema = Constraint(ConstraintKind.JSON_SCHEMA, json.dumps(PERSON))
    texts = [text_of(outputs, test_tokenizer) for outputs in run_batch(engine, schema)]
    assert max(longest_whitespace_run(text) for text in texts) <= MAX_JSON_WHITESPACE
    # The bound is what holds the model back: allowed more, this weak model takes it.
    monkeypatch.setattr(compiler_module, "MAX_JSON_WHITESPACE", 4 * MAX_JSON_WHITESPACE)
    loose = create_engine(test_model_dir)
    texts = [text_of(outputs, test_tokenizer) for outputs in run_batch(loose, schema)]
    assert max(longest_whitespace_run(text) for text in texts) > MAX_JSON_WHITESPACE


def test_ids_past_the_tokenizer_never_come_out_of_a_padded_lm_head(test_model_dir, test_tokenizer, tmp_path):
    """A model whose LM head has 600 rows over a 512-token tokenizer: the mask covers the logits' whole width."""
    from model_handler.tiny_model import build_tiny_model

    model_dir = build_tiny_model(
        tmp_path / "padded", vocab_size=600, hidden_size=64, intermediate_size=128, num_layers=1, init_std=0.2
    )
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(test_model_dir / name, model_dir / name)
    engine = create_engine(model_dir)
    regex = Constraint(ConstraintKind.REGEX, EMAIL)
    for seed in range(4):
        engine.add_request(constrained(f"p{seed}", regex, seed))
    results = run_to_completion(engine)
    for seed in range(4):
        token_ids = tokens_of(results[f"p{seed}"])
        assert max(token_ids) < 512 and re.fullmatch(EMAIL, text_of(results[f"p{seed}"], test_tokenizer))


def test_without_xgrammar_unconstrained_requests_run_and_constrained_ones_are_rejected(test_model_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "xgrammar", None)  # what `import xgrammar` meets in an image without it
    engine = create_engine(test_model_dir)
    assert engine.info().grammar_backend == ""
    engine.add_request(constrained("json", Constraint(ConstraintKind.JSON_OBJECT), seed=1))
    engine.add_request(EngineRequest("free", [5, 6, 7], SamplingParams(max_tokens=5, min_tokens=5, temperature=0)))
    results = run_to_completion(engine)
    assert len(tokens_of(results["free"])) == 5
    [refused] = results["json"]
    assert refused.finish_reason is FinishReason.REJECTED and not refused.new_token_ids
    assert refused.failure_message.startswith("constrained decoding is unavailable: the engine's image lacks the")


def test_info_names_the_grammar_backend(engine):
    assert engine.info().grammar_backend == "xgrammar 0.2.9"
