"""The grammar benchmark: a short real run on the tiny model, A and B alternating, writing JSON."""

from __future__ import annotations

import json

from bench import grammar


def test_short_run_measures_both_comparisons_and_writes_json(tmp_path, capsys):
    out = tmp_path / "grammar.json"
    args = "--model tiny --streams 3 --requests 4 --compiles 2 --max-tokens 10 --prompt-tokens 8 --warm-steps 2"
    result = grammar.main([*args.split(), "--joiner-tokens", "3", "--rounds", "2", "--out", str(out)])
    assert json.loads(out.read_text()) == result
    runs = result["throughput"]
    assert len(runs["unconstrained"]) == len(runs["json_schema"]) == 2
    assert all(run["num_tokens"] == 4 * 10 for run in runs["unconstrained"])  # min_tokens holds them to 10
    assert all(0 < run["num_tokens"] <= 4 * 10 and run["tokens_per_s"] > 0 for run in runs["json_schema"])
    latency = result["latency"]
    assert [run["num_compiles"] for run in latency["new_schemas"]] == [2, 2]  # new schemas every round
    assert [run["num_compiles"] for run in latency["cached_schemas"]] == [0, 0]
    assert all(
        run["num_itl_samples"] > 0 and run["itl_p99_ms"] >= run["itl_p50_ms"] > 0 for run in latency["new_schemas"]
    )
    summary = result["summary"]
    assert summary["throughput_pass"] == (summary["throughput_ratio"] >= grammar.THROUGHPUT_TARGET)
    assert result["machine"]["git_commit"] and result["machine"]["date_utc"]
    assert "ITL p99 new / cached schemas" in capsys.readouterr().out


def test_every_index_gives_a_distinct_schema():
    assert len({grammar.record_schema(i) for i in range(50)}) == 50
