"""The per-step grammar mask: constrained rows of a mixed batch masked to exactly what their grammar allows, the
other rows untouched bit for bit; min_tokens against a grammar; the sampler's path; the GPU kernel."""

from __future__ import annotations

import json

import pytest
import torch

from model_handler.constraints import Constraint, ConstraintKind
from model_handler.grammar_bitmask import apply_grammar_bitmask
from model_handler.grammar_matcher import RequestGrammar
from model_handler.sampler import Sampler
from tests.model_handler.engine_factories import create_sequence

V = 512  # the test model's vocabulary
EOS = 2
SCHEMA = Constraint(
    ConstraintKind.JSON_SCHEMA,
    json.dumps({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}),
)


def grammar_for(grammar_compiler, constraint: Constraint, text: str = "", tokenizer=None) -> RequestGrammar:
    """A matcher for `constraint` that has accepted `text` already."""
    grammar = RequestGrammar(grammar_compiler.submit(constraint).result(30))
    for token_id in tokenizer.encode(text, add_special_tokens=False) if text else ():
        assert grammar.accept(token_id)
    return grammar


def allowed_by_accepting(grammar: RequestGrammar) -> set[int]:
    """Every token the matcher accepts next, found by trying each on a copy: independent of the mask."""
    return {t for t in range(V) if grammar._matcher.fork().accept_token(t)}


def constrained_seq(grammar: RequestGrammar, **params):
    seq = create_sequence([5, 6, 7], eos_token_ids=(EOS,), **params)
    seq.grammar = grammar
    return seq


def test_constrained_rows_are_masked_and_the_others_untouched_bit_for_bit(grammar_compiler, test_tokenizer):
    grammars = {
        1: grammar_for(grammar_compiler, SCHEMA, '{"n": ', test_tokenizer),
        3: grammar_for(grammar_compiler, Constraint(ConstraintKind.REGEX, "(cat|dog)s?"), "ca", test_tokenizer),
    }
    seqs = [constrained_seq(grammars[i]) if i in grammars else create_sequence([9, 8]) for i in range(5)]
    logits = torch.randn(5, V, generator=torch.Generator().manual_seed(0))
    masked = logits.clone()
    apply_grammar_bitmask(masked, seqs)
    for row in (0, 2, 4):
        assert torch.equal(masked[row], logits[row])
    for row, grammar in grammars.items():
        finite = set(torch.isfinite(masked[row]).nonzero()[:, 0].tolist())
        assert finite == allowed_by_accepting(grammar) and finite
        assert torch.equal(masked[row, sorted(finite)], logits[row, sorted(finite)])


def test_a_batch_without_constrained_rows_is_left_alone(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "xgrammar", None)  # not even imported
    logits = torch.randn(3, V)
    masked = logits.clone()
    apply_grammar_bitmask(masked, [create_sequence([1]) for _ in range(3)])
    assert torch.equal(masked, logits)


def test_a_complete_grammar_allows_only_eos(grammar_compiler, test_tokenizer):
    grammar = grammar_for(grammar_compiler, SCHEMA, '{"n": 12}', test_tokenizer)
    assert allowed_by_accepting(grammar) == {EOS}
    logits = torch.zeros(1, V)
    apply_grammar_bitmask(logits, [constrained_seq(grammar)])
    assert torch.isfinite(logits[0]).nonzero()[:, 0].tolist() == [EOS]
    assert grammar.accept(EOS) and grammar.is_terminated


def eos_favoured_logits() -> torch.Tensor:
    logits = torch.zeros(1, V)
    logits[0, EOS] = 50.0  # greedy picks EOS wherever it is allowed
    return logits


def test_min_tokens_holds_eos_back_while_the_grammar_can_go_on(grammar_compiler, test_tokenizer):
    regex = Constraint(ConstraintKind.REGEX, "[a-z]+")
    early = constrained_seq(grammar_for(grammar_compiler, regex, "ab", test_tokenizer), min_tokens=5, temperature=0)
    late = constrained_seq(grammar_for(grammar_compiler, regex, "ab", test_tokenizer), temperature=0)
    sampler = Sampler()
    assert sampler(eos_favoured_logits(), [late]).token_ids == [EOS]  # the grammar may end here
    chosen = sampler(eos_favoured_logits(), [early]).token_ids[0]
    assert chosen != EOS and early.grammar.accept(chosen)


def test_a_grammar_that_must_end_ends_even_before_min_tokens(grammar_compiler, test_tokenizer):
    done = grammar_for(grammar_compiler, Constraint(ConstraintKind.REGEX, "ab"), "ab", test_tokenizer)
    seq = constrained_seq(done, min_tokens=50, temperature=0, stop_token_ids=(7,))
    logits = torch.zeros(1, V)
    logits[0, 7] = 50.0  # a stop token the grammar forbids
    assert Sampler()(logits, [seq]).token_ids == [EOS]


@pytest.mark.parametrize("params", [{"temperature": 0}, {"temperature": 1.0, "top_k": 5, "top_p": 0.5, "seed": 3}])
def test_sampled_tokens_follow_the_grammar_after_penalties(grammar_compiler, test_tokenizer, params):
    """Penalties first, then the mask: a penalised row still picks only allowed tokens, and an unconstrained
    row of the same batch picks what it picks alone (greedy, or seeded: no draw depends on the batch)."""
    grammar = grammar_for(grammar_compiler, SCHEMA, '{"n', test_tokenizer)
    allowed = allowed_by_accepting(grammar)
    constrained = constrained_seq(grammar, repetition_penalty=1.3, frequency_penalty=0.5, **params)
    free = create_sequence([5, 6, 7], **params)
    logits = torch.randn(2, V, generator=torch.Generator().manual_seed(1))
    chosen = Sampler(seed=4).choose(logits, [constrained, free]).tolist()
    assert chosen[0] in allowed
    free_alone = create_sequence([5, 6, 7], **params)  # greedy or seeded: its pick is its own
    assert chosen[1] == Sampler(seed=4).choose(logits[1:], [free_alone]).item()


def test_the_gpu_kernel_masks_like_the_cpu_one_under_the_triton_interpreter(grammar_compiler, test_tokenizer):
    """On CUDA xgrammar applies the bitmask with its Triton kernel: that kernel, run here by the interpreter
    (its launcher asks the CUDA device for its SM count, so the kernel is called directly)."""
    import xgrammar as xgr
    from xgrammar.kernels.apply_token_bitmask_inplace_triton import apply_token_bitmask_inplace_kernel

    grammar = grammar_for(grammar_compiler, SCHEMA, '{"n": 4', test_tokenizer)
    bitmask = xgr.allocate_token_bitmask(3, V)
    grammar.fill(bitmask, 1)
    logits = torch.randn(3, V)
    by_cpu, by_triton = logits.clone(), logits.clone()
    xgr.apply_token_bitmask_inplace(by_cpu, bitmask, vocab_size=V, indices=[1])
    indices = torch.tensor([1], dtype=torch.int32)
    num_programs, block_size = 4, 256
    apply_token_bitmask_inplace_kernel[(num_programs,)](
        by_triton, bitmask, indices, 1, V, by_triton.stride(0), bitmask.stride(0), num_programs, block_size
    )
    assert torch.equal(by_cpu, by_triton) and not torch.equal(by_cpu, logits)
