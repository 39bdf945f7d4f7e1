"""The offline engine benchmark: variant parsing and a short real run on the tiny model."""

from __future__ import annotations

import pytest

from bench import engine_step
from bench.engine_step import Variant


def test_variant_parses_sampling_threads_attributes_and_environment():
    variant = Variant.parse("topp:temperature=1,top_p=0.9,top_k=50,threads=1,env.FOO=bar,attr.math.tau=2.5")
    assert variant.name == "topp" and variant.backend is None
    assert variant.sampling == {"temperature": 1.0, "top_p": 0.9, "top_k": 50}
    assert (variant.threads, variant.env, variant.attrs) == (1, {"FOO": "bar"}, {"math.tau": 2.5})
    assert Variant.parse("greedy:").sampling == {"temperature": 0.0}


@pytest.mark.parametrize("text", ["x:top_p", "x:color=red"])
def test_bad_variant_is_rejected(text):
    with pytest.raises(ValueError, match="variant"):
        Variant.parse(text)


def test_closed_loop_generates_every_requested_token():
    import argparse

    from model_handler.tiny_model import default_model_dir

    args = argparse.Namespace(prompt_tokens=5, max_tokens=4, concurrency=2, block_size=16)
    engine = engine_step.build_engine(default_model_dir("tiny"), args)
    prompts = engine_step.make_prompts(3, 5, engine.model_config.vocab_size, seed=0)
    result = engine_step.run_workload(engine, prompts, 4, 2, {"temperature": 0.0}, "t")
    assert result.num_tokens == 3 * 4 and result.tokens_per_s > 0
    assert not engine.has_unfinished_requests()


def test_short_run_prints_a_row_per_variant_and_restores_attributes(capsys):
    import math

    tau = math.tau
    engine_step.main(
        [
            "--concurrency",
            "2",
            "--requests",
            "3",
            "--prompt-tokens",
            "5",
            "--max-tokens",
            "4",
            "--rounds",
            "1",
            "--variant",
            "a:",
            "--variant",
            "b:threads=1,attr.math.tau=1.0",
        ]
    )
    assert math.tau == tau
    lines = capsys.readouterr().out.splitlines()
    table = {line.split()[0]: line.split()[1:] for line in lines[-2:]}
    assert set(table) == {"a", "b"} and all(float(row[0]) > 0 for row in table.values())  # tok/s


def test_variants_with_their_own_attention_backend_run_on_their_own_engines(monkeypatch, capsys):
    built = []
    build = engine_step.build_engine
    monkeypatch.setattr(engine_step, "build_engine", lambda *a: built.append(a[-1]) or build(*a))
    engine_step.main(
        [
            "--concurrency",
            "2",
            "--requests",
            "2",
            "--prompt-tokens",
            "5",
            "--max-tokens",
            "3",
            "--rounds",
            "1",
            "--variant",
            "t:backend=torch",
            "--variant",
            "t2:backend=torch,threads=1",
            "--variant",
            "d:",
        ]
    )
    assert built == ["torch", None]  # one engine per distinct backend, the default's included
    assert Variant.parse("c:backend=cpu").backend == "cpu"
