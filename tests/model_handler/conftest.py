"""Engine-test fixtures: the small test model folder, transformers' copy of it, its tokenizer and grammar
compiler, and the KV-block check."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.model_handler.engine_factories import build_test_model


@pytest.fixture(scope="session")
def test_model_dir(tmp_path_factory) -> Path:
    return build_test_model(tmp_path_factory.mktemp("engine-test-model"))


@pytest.fixture(scope="session")
def hf_model(test_model_dir):
    """transformers' reading of the same folder, fp32: the oracle for greedy tokens and logprobs."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(test_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def test_tokenizer(test_model_dir):
    """The test model's own tokenizer, to read constrained outputs as text."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(test_model_dir)


@pytest.fixture(scope="session")
def grammar_compiler(test_model_dir):
    """A grammar compiler over the test model's tokenizer (vocabulary 512, EOS id 2), as its engine builds it."""
    from model_handler.grammar_compiler import GrammarCompiler

    compiler = GrammarCompiler(test_model_dir, 512, [2])
    yield compiler
    compiler.shutdown()


@pytest.fixture(autouse=True)
def _engine_blocks_returned(request):
    """Every engine a test uses must end idle with all its KV blocks free again (cached ones count as free)."""
    from model_handler.engine import Engine

    engines = []
    for name in request.fixturenames:
        if name.endswith("engine"):
            value = request.getfixturevalue(name)
            if isinstance(value, Engine):
                engines.append(value)
    for engine in engines:
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    yield
    for engine in engines:
        assert not engine.has_unfinished_requests(), "test left requests in the engine"
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks, "KV blocks leaked"
        assert all(count == 0 for count in engine.block_manager.ref_counts)
