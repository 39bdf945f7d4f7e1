"""The CPU attention benchmark: its paged inputs, FLOP count and a short real run writing JSON."""

from __future__ import annotations

import json

import pytest
import torch

from bench import cpu_attention
from bench.cpu_attention import Case
from tests import cpu_kernels

# Justified skip: the benchmark times the C++ kernels, which are not built on a GPU machine (the build would only
# spend device time) or without a C++ compiler; where a compiler exists they must build (tests/cpu_kernels.py).
pytestmark = pytest.mark.skipif(not cpu_kernels.expected(), reason="GPU machine, or no C++ compiler")


def test_paged_inputs_give_each_sequence_its_own_blocks():
    case = Case("t", 4, 2, 32, "prefill", [(20, 5), (0, 40)])
    x = cpu_attention.paged_inputs(case, torch.float32)
    assert x["query"].shape == (45, 4, 32) and x["seq_lens"].tolist() == [25, 40]
    assert x["query_start_loc"].tolist() == [0, 5, 45]
    used = [b for i, n in enumerate((2, 3)) for b in x["block_tables"][i, :n].tolist()]
    assert len(set(used)) == len(used) == 5


def test_flops_count_causal_keys():
    # one prompt of 2 new tokens after 3 cached: 3+1 and 3+2 keys = 9 keys, x 4 flops x heads x dim
    assert cpu_attention.flops(Case("t", 2, 1, 8, "prefill", [(3, 2)])) == 4 * 9 * 2 * 8


def test_short_run_agrees_with_the_torch_path_and_writes_json(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(
        cpu_attention,
        "CASES",
        [
            Case("prefill", 4, 2, 64, "prefill", [(0, 40), (17, 9)]),
            Case("decode", 4, 2, 64, "decode", [(30, 1), (5, 1)]),
        ],
    )
    out = tmp_path / "r.json"
    cpu_attention.main(["--dtypes", "float32", "--iterations", "2", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["case"] for r in rows] == ["prefill", "decode"]
    assert all(r["max_abs_diff"] < 1e-5 and r["kernel_us"] > 0 and r["torch_us"] > 0 for r in rows)
    assert "prefill kernel vectorized" in capsys.readouterr().out
