"""The GPU check without a GPU: shell syntax and usage, the random model folder, the report's verdicts, and the
whole `bench/gpu_check.sh --cpu-smoke` run (same Python, tiny model of the same config, on CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import gpu_engine, gpu_model, gpu_moe

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_check.sh"


def run_script(*args: str, env: dict | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHON": sys.executable, **(env or {})},
    )


def test_script_parses_and_explains_itself():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], check=False).returncode == 0
    done = run_script("--help")
    assert done.returncode == 0
    words = (
        "--cpu-smoke",
        "pytest -q -m gpu",
        "gpu_kernels.py",
        "generate_batch",
        "gpu_check.json",
        "--skip-moe",
        "--case",
    )
    for word in words:
        assert word in done.stdout


@pytest.mark.parametrize(
    "args", [("--bogus",), ("a", "b"), ("--budget-s", "soon"), ("--model-dir",), ("--case", "falcon"), ("--case",)]
)
def test_bad_usage_exits_2_before_doing_anything(args, tmp_path):
    done = run_script(*args, env={"TMPDIR": str(tmp_path)})
    assert done.returncode == 2 and "gpu_check.sh:" in done.stderr
    assert not list(tmp_path.iterdir())  # no work folder, no results


def test_model_folder_streams_valid_shards(tmp_path):
    from safetensors import safe_open

    out = tmp_path / "m"
    record = gpu_model.build(out, "smoke", "cpu", shard_gb=0.003)
    expected = gpu_model.tensor_shapes(gpu_model.SMOKE)
    index = json.loads((out / gpu_model.INDEX_FILE).read_text())
    assert record["num_shards"] == len(set(index["weight_map"].values())) > 1
    tensors = {}
    for name in sorted(set(index["weight_map"].values())):
        with safe_open(str(out / name), framework="pt") as f:
            tensors |= {key: f.get_tensor(key) for key in f.keys()}
    assert {k: tuple(v.shape) for k, v in tensors.items()} == expected
    assert index["metadata"]["total_size"] == record["weight_bytes"] == sum(2 * v.numel() for v in tensors.values())
    assert all(str(v.dtype) == "torch.bfloat16" for v in tensors.values())
    assert bool((tensors["model.norm.weight"] == 1).all())
    q0, q1 = tensors["model.layers.0.self_attn.q_proj.weight"], tensors["model.layers.1.self_attn.q_proj.weight"]
    assert abs(q0.float().std().item() - gpu_model.WEIGHT_STD) < 2e-3 and not q0.equal(q1)
    config = json.loads((out / "config.json").read_text())
    assert config["rope_scaling"]["rope_type"] == "llama3" and config["rope_theta"] == 500000.0
    again = gpu_model.build(out, "smoke", "cpu", shard_gb=0.003)
    assert again["reused"] and again["weight_bytes"] == record["weight_bytes"]


def test_gemma2_folder_has_its_norms_at_zero_and_no_lm_head(tmp_path):
    """Gemma scales by (1 + w): norms written as zeros (transformers' init); pre/post-MLP norms; tied embeddings."""
    from safetensors import safe_open

    gpu_model.build(tmp_path, "gemma2-smoke", "cpu")
    with safe_open(str(tmp_path / "model-00001-of-00001.safetensors"), framework="pt") as f:
        names = set(f.keys())
        assert bool((f.get_tensor("model.layers.0.post_feedforward_layernorm.weight") == 0).all())
    assert "lm_head.weight" not in names and "model.layers.3.pre_feedforward_layernorm.weight" in names
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["Gemma2ForCausalLM"] and config["sliding_window"] == 8


def test_gemma2_9b_plan_matches_the_published_size():
    shapes = gpu_model.tensor_shapes(gpu_model.GEMMA2_9B)
    assert sum(int.__mul__(*s) if len(s) == 2 else s[0] for s in shapes.values()) == 9_241_705_984


def test_llama3_8b_plan_matches_the_published_size():
    shapes = gpu_model.tensor_shapes(gpu_model.LLAMA3_8B)
    num_params = sum(int.__mul__(*s) if len(s) == 2 else s[0] for s in shapes.values())
    assert num_params == 8_030_261_248  # Meta-Llama-3.1-8B
    shards = gpu_model.plan_shards(shapes, 2 << 30)
    assert [n for s in shards for n in s] == list(shapes) and len(shards) == 8


def test_mixtral_plan_is_mixtral_8x7b_cut_to_four_layers():
    shapes = gpu_model.tensor_shapes({**gpu_model.MIXTRAL_4L, "num_hidden_layers": 32})
    num_params = sum(int.__mul__(*s) if len(s) == 2 else s[0] for s in shapes.values())
    assert num_params == 46_702_792_704  # Mixtral-8x7B-v0.1
    four = gpu_model.tensor_shapes(gpu_model.MIXTRAL_4L)
    assert {n for n in four if ".layers.4." in n} == set()
    assert four["model.layers.3.block_sparse_moe.experts.7.w2.weight"] == (4096, 14336)
    assert four["model.layers.0.block_sparse_moe.gate.weight"] == (8, 4096)
    assert not any(".mlp." in n for n in four)


def test_mixtral_folder_loads_as_our_moe_model(tmp_path):
    import torch

    from model_handler.kernels import TorchReferenceBackend
    from model_handler.layers.moe import SparseMoeBlock
    from model_handler.model_loader import load_model

    record = gpu_model.build(tmp_path, "mixtral-smoke", "cpu")
    assert record["expert_bytes"] == 2 * 2 * 4 * 3 * 128 * 256  # 2 layers x 4 experts x 3 projections, bf16
    model = load_model(
        tmp_path, dtype=torch.float32, device=torch.device("cpu"), attention_backend=TorchReferenceBackend()
    )
    assert all(isinstance(layer.mlp, SparseMoeBlock) for layer in model.model.layers)


def test_moe_check_fails_when_the_fused_kernel_is_wrong(tmp_path, monkeypatch):
    from model_handler.kernels import triton_moe

    gpu_model.build(tmp_path / "m", "mixtral-smoke", "cpu")
    fused = triton_moe.fused_experts
    monkeypatch.setattr(triton_moe, "fused_experts", lambda *a, **k: fused(*a, **k) * 1.01)
    argv = [str(tmp_path / "m"), "--device", "cpu", "--dtype", "float32", "--batch-sizes", "4", "--out"]
    assert gpu_moe.main([*argv, str(tmp_path / "moe.json")]) == 1
    record = json.loads((tmp_path / "moe.json").read_text())
    assert [c["passed"] for c in record["checks"]] == [False, False]  # the layer, and the model through it
    assert record["checks"][0]["relative_error"] == pytest.approx(0.01, rel=1e-3)


def test_baseline_work_is_capped_only_when_it_would_pass_the_deadline():
    history = [
        {"batch": 1, "num_requests": 1, "decode_ms_step_median": 30.0, "ttft_ms_max": 50.0},
        {"batch": 32, "num_requests": 32, "decode_ms_step_median": 40.0, "ttft_ms_max": 400.0},
    ]
    assert gpu_engine.plan_hf_requests(128, [], 0.0, 128) == 128  # nothing measured yet: try it all
    assert gpu_engine.plan_hf_requests(128, history, 200.0, 128) == 128
    # 128 steps of ~71 ms plus 1.6 s of prefill, with margin ~19 s: half of it fits in 10 s.
    capped = gpu_engine.plan_hf_requests(128, history, 10.0, 128)
    assert 32 <= capped < 128
    assert gpu_engine.plan_hf_requests(128, history, -1.0, 128) == 1


def write_results(
    folder: Path,
    *,
    step_ms: float,
    ours_rates: dict,
    hf_rates: dict,
    kernels_pass: bool = True,
    exact: bool = True,
    async_step_ms: float | None = None,
    async_tokens: list | None = None,
) -> None:
    def runs(rates, ms, tokens=(5, 6, 7)):
        return [
            {
                "batch": b,
                "num_requests": b,
                "output_tok_s": r,
                "decode_ms_step_median": ms,
                "ttft_ms_median": 20.0,
                "ttft_ms_max": 30.0,
                "exact_lengths": exact,
                "first_tokens": [list(tokens)] * b,
                "capped": None,
                "num_decode_steps": 127,
                "graph_replays": 127,
                "total_output_tokens": 128 * b,
            }
            for b, r in rates.items()
        ]

    files = {
        "gpu_model.json": {
            "model_dir": "/dev/shm/m",
            "weight_bytes": 16_060_522_496,
            "embedding_bytes": 1_050_673_152,
            "build_s": 30.0,
            "reused": False,
        },
        "gpu_kernels.json": {"passed": kernels_pass, "checks": [{"name": "decode", "passed": kernels_pass}]},
        "gpu_engine_ours.json": {
            "device": "NVIDIA H100 80GB HBM3",
            "hbm_datasheet_gbs": 3350,
            "copy_gbs": 3000.0,
            "engine": {"cuda_graphs": True},
            "runs": runs(ours_rates, step_ms),
        },
        "gpu_engine_hf.json": {"runs": runs(hf_rates, 35.0)},
    }
    if async_step_ms is not None:
        rates = {b: r * step_ms / async_step_ms for b, r in ours_rates.items()}
        files["gpu_engine_ours-async.json"] = {
            **files["gpu_engine_ours.json"],
            "async_scheduling": True,
            "runs": runs(rates, async_step_ms, async_tokens or (5, 6, 7)),
        }
    else:
        (folder / "gpu_engine_ours-async.json").unlink(missing_ok=True)
    for name, data in files.items():
        (folder / name).write_text(json.dumps(data))


def report(folder: Path, *stages: str) -> tuple[int, dict]:
    argv = ["report", "--results", str(folder), "--require-gpu-tests"]
    for stage in stages or ("build=0", "kernels=0", "ours=0", "hf=0"):
        argv += ["--stage", stage]
    rc = gpu_engine.main(argv)
    return rc, json.loads((folder / gpu_engine.SUMMARY_FILE).read_text())


def test_report_computes_roofline_and_speedups(tmp_path, capsys):
    write_results(tmp_path, step_ms=6.0, ours_rates={1: 160.0, 32: 3000.0}, hf_rates={1: 30.0, 32: 1500.0})
    rc, summary = report(tmp_path)
    assert rc == 0
    verdicts = {t["name"]: t["ok"] for t in summary["targets"]}
    # 16.06 GB per 6 ms step = 2677 GB/s = 79.9% of 3350: just short of the 80% target.
    assert summary["roofline"]["frac_datasheet"] == pytest.approx(0.799, abs=1e-3)
    assert verdicts["batch-1 decode >= 80% of the HBM roofline"] is False
    assert verdicts["ours >= 3x transformers generate_batch at batch 1"] is True
    assert verdicts["ours >= 3x transformers generate_batch at batch 32"] is False
    assert summary["agreement"]["first_token_match"] == 1.0
    printed = capsys.readouterr().out
    assert "FAIL batch-1 decode" in printed and "5.33x" in printed
    assert "replayed as CUDA graphs: b1 127/127, b32 127/127" in printed


def test_report_gives_async_scheduling_its_own_rows_and_verdicts(tmp_path, capsys):
    # The step-by-step run misses the roofline target at 6 ms per step; the async one makes it at 5.5 ms.
    write_results(tmp_path, step_ms=6.0, ours_rates={1: 160.0}, hf_rates={1: 30.0}, async_step_ms=5.5)
    rc, summary = report(tmp_path, "build=0", "kernels=0", "ours=0", "ours-async=0", "hf=0")
    assert rc == 0
    verdicts = {t["name"]: t["ok"] for t in summary["targets"]}
    assert verdicts["batch-1 decode >= 80% of the HBM roofline"] is False
    assert verdicts["batch-1 decode >= 80% of the HBM roofline (async)"] is True
    assert verdicts["ours >= 3x transformers generate_batch at batch 1 (async)"] is True
    assert summary["roofline_async"]["frac_datasheet"] == pytest.approx(0.872, abs=1e-3)
    same = next(c for c in summary["checks"] if c["name"] == "ours (async) generates the step-by-step tokens")
    assert same["ok"] and same["detail"].startswith("1/1 requests identical")
    printed = capsys.readouterr().out
    assert "ours (async) decode steps replayed as CUDA graphs: b1 127/127" in printed
    assert "5.82x" in printed  # async tok/s over generate_batch, in the table


def test_report_fails_when_async_scheduling_changes_a_token(tmp_path):
    write_results(
        tmp_path,
        step_ms=6.0,
        ours_rates={1: 160.0, 8: 900.0},
        hf_rates={1: 30.0},
        async_step_ms=5.5,
        async_tokens=(5, 6, 8),
    )
    rc, summary = report(tmp_path, "build=0", "kernels=0", "ours=0", "ours-async=0", "hf=0")
    same = next(c for c in summary["checks"] if c["name"] == "ours (async) generates the step-by-step tokens")
    assert rc == 1 and not same["ok"] and same["detail"].startswith("0/9 requests identical")


def test_report_exit_status_separates_wrong_results_from_failed_stages(tmp_path):
    write_results(tmp_path, step_ms=5.0, ours_rates={1: 190.0}, hf_rates={1: 30.0}, kernels_pass=False)
    rc, summary = report(tmp_path)
    assert rc == 1 and not next(c for c in summary["checks"] if c["name"].startswith("kernels"))["ok"]
    write_results(tmp_path, step_ms=5.0, ours_rates={1: 190.0}, hf_rates={1: 30.0}, exact=False)
    assert report(tmp_path)[0] == 1
    write_results(tmp_path, step_ms=5.0, ours_rates={1: 190.0}, hf_rates={1: 30.0})
    rc, summary = report(tmp_path, "build=0", "kernels=0", "ours=0", "hf=124")
    assert rc == 2 and summary["stages"]["hf"] == "124"
    # A gpu test stage where nothing passed is a failure on the GPU (the junit XML is missing here).
    assert report(tmp_path, "build=0", "pytest=0", "ours=0")[0] == 1


def write_moe_results(folder: Path, *, passed: bool = True, step_ms: float = 2.0) -> None:
    """gpu_moe.json and gpu_engine_moe.json as a GPU run writes them (a 4-layer Mixtral-shaped model)."""
    model = {"weight_bytes": 12_200_000_000, "expert_bytes": 11_274_289_152, "embedding_bytes": 262_144_000}
    moe = {
        "passed": passed,
        "num_layers": 4,
        "experts": {"num_experts": 8, "top_k": 2},
        "model": model,
        "checks": [
            {"name": "layer experts, 1 tokens", "passed": True, "relative_error": 0.004},
            {"name": "model logits", "passed": passed, "relative_error": 0.01 if passed else 0.3},
        ],
        "layer_timings": [
            {
                "tokens": 1,
                "experts_used": "2/8",
                "fused_ms": 0.25,
                "torch_loop_ms": 0.9,
                "speedup": 3.6,
                "fused_weight_gbs": 2818.6,
            }
        ],
    }
    run = {
        "batch": 1,
        "num_requests": 1,
        "output_tok_s": 480.0,
        "decode_ms_step_median": step_ms,
        "exact_lengths": True,
        "graph_replays": 127,
        "num_decode_steps": 127,
    }
    (folder / "gpu_moe.json").write_text(json.dumps(moe))
    (folder / "gpu_engine_moe.json").write_text(json.dumps({"hbm_datasheet_gbs": 3350, "runs": [run]}))


def test_report_adds_the_moe_check_and_its_rates(tmp_path, capsys):
    write_results(tmp_path, step_ms=6.0, ours_rates={1: 160.0}, hf_rates={1: 30.0})
    write_moe_results(tmp_path)
    rc, summary = report(tmp_path, "build=0", "kernels=0", "ours=0", "moe=0", "moe-ours=0", "hf=0")
    assert rc == 0 and summary["stages"]["moe"] == "0"
    checks = {c["name"]: c for c in summary["checks"]}
    moe_check = checks["MoE: fused Triton experts vs the torch path (bench/gpu_moe.py)"]
    assert moe_check["ok"] and moe_check["detail"] == "2/2 checks pass, worst relative error 0.01"
    assert checks["ours (MoE): every request got exactly --output-tokens"]["ok"]
    # One token reads the non-expert weights but one embedding row, and 2 of the 8 experts:
    # 12.2 GB - 0.75 * 11.27 GB - 0.26 GB = 3.48 GB per 2 ms step = 1741 GB/s = 52.0% of 3350.
    assert "ours (MoE) batch 1: 3.48 GB of weights read per step -> 1741 GB/s = 52.0%" in capsys.readouterr().out
    assert any("fused 0.25 ms, torch loop 0.9 ms (3.6x)" in line for line in summary["moe"])


def test_report_fails_when_the_moe_kernel_disagrees(tmp_path):
    write_results(tmp_path, step_ms=6.0, ours_rates={1: 160.0}, hf_rates={1: 30.0})
    write_moe_results(tmp_path, passed=False)
    rc, summary = report(tmp_path, "build=0", "kernels=0", "ours=0", "moe=1", "moe-ours=0", "hf=0")
    moe_check = next(c for c in summary["checks"] if c["name"].startswith("MoE"))
    assert rc == 1 and not moe_check["ok"] and moe_check["detail"].endswith("failed: model logits")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check-out")
    work = tmp_path_factory.mktemp("gpu-check-tmp")
    done = run_script(str(out), "--cpu-smoke", env={"TMPDIR": str(work)}, timeout=240)
    return done, out


def test_cpu_smoke_runs_every_stage_and_reports(smoke):
    done, out = smoke
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == [
        "gpu_check.json",
        "gpu_check.log",
        "gpu_engine_hf.json",
        "gpu_engine_moe.json",
        "gpu_engine_ours-async.json",
        "gpu_engine_ours.json",
        "gpu_kernels.json",
        "gpu_model.json",
        "gpu_moe.json",
        "profile-async.json",
        "profile-sync.json",
    ]
    # The profile stage ran the engine in both modes: the async one reads each step's tokens a step later.
    profiles = {mode: json.loads((out / f"profile-{mode}.json").read_text()) for mode in ("sync", "async")}
    assert profiles["sync"]["async_scheduling"] is False and profiles["async"]["async_scheduling"] is True
    assert "update" in profiles["sync"]["runs"][0]["host_phases_ms_median"]
    assert "read_tokens_and_update" in profiles["async"]["runs"][0]["host_phases_ms_median"]
    assert [r["batch"] for r in profiles["async"]["runs"]] == [1, 4]
    summary = json.loads((out / "gpu_check.json").read_text())
    assert summary["stages"] == {
        "build": "0",
        "pytest": "0",
        "kernels": "0",
        "ours": "0",
        "ours-async": "0",
        "moe": "0",
        "moe-ours": "0",
        "hf": "0",
    }
    assert all(c["ok"] for c in summary["checks"]) and len(summary["checks"]) == 7
    assert "gpu_check: exit 0" in (out / "gpu_check.log").read_text()


def test_cpu_smoke_checks_the_fused_moe_and_runs_the_engine_on_the_moe_model(smoke):
    _, out = smoke
    moe = json.loads((out / "gpu_moe.json").read_text())
    assert moe["passed"] and moe["experts"] == {"num_experts": 4, "top_k": 2} and moe["model"]["expert_bytes"] > 0
    assert [c["name"] for c in moe["checks"]][:2] == ["layer experts, 1 tokens", "layer experts, 16 tokens"]
    engine = json.loads((out / "gpu_engine_moe.json").read_text())
    assert [r["batch"] for r in engine["runs"]] == [1, 4] and all(r["exact_lengths"] for r in engine["runs"])


def test_cpu_smoke_both_systems_generate_the_same_greedy_tokens(smoke):
    _, out = smoke
    ours = json.loads((out / "gpu_engine_ours.json").read_text())
    ours_async = json.loads((out / "gpu_engine_ours-async.json").read_text())
    hf = json.loads((out / "gpu_engine_hf.json").read_text())
    assert ours["async_scheduling"] is False and ours_async["async_scheduling"] is True
    for record in (ours, ours_async, hf):
        assert [r["batch"] for r in record["runs"]] == [1, 4]
        assert all(r["exact_lengths"] and r["total_output_tokens"] == 8 * r["batch"] for r in record["runs"])
        assert all(r["output_tok_s"] > 0 and r["ttft_ms_median"] > 0 for r in record["runs"])
    assert ours["engine"]["max_num_seqs"] == 4 and ours["engine"]["dtype"] == "float32"
    # float32 on both sides, same llama3-scaled rope config: our model computes transformers' function.
    summary = json.loads((out / "gpu_check.json").read_text())
    assert summary["agreement"]["first_token_match"] == 1.0 and summary["agreement"]["requests"] == 5


# ---- the Gemma-2-9B case (--case gemma2-9b) ----------------------------------------------------------------


def test_gemma2_case_cpu_smoke_checks_the_serving_path_and_decodes(tmp_path):
    """The same Python as on a GPU, on CPU: a Gemma-2 folder with a window (8) shorter than its prompts, the C++
    kernels against the torch path on it (float32: rounding only), then the engine's decode at batches 1 and 4."""
    out = tmp_path / "out"
    done = run_script(str(out), "--cpu-smoke", "--case", "gemma2-9b", env={"TMPDIR": str(tmp_path)}, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    summary = json.loads((out / "gpu_check_gemma2-9b.json").read_text())
    assert summary["stages"] == {"build": "0", "check": "0", "ours": "0"}
    check = summary["check"]
    assert check["passed"] and check["architecture"] == "Gemma2ForCausalLM" and check["sliding_windows"] == [8]
    assert check["prompt_lengths"][0] > 8 and check["max_rel_l2"] < 1e-4 and check["top1"] == 1.0
    assert [row["batch"] for row in summary["decode"]] == [1, 4] and all(
        row["output_tok_s"] > 0 for row in summary["decode"]
    )
    assert "gpu_check: exit 0" in (out / "gpu_check_gemma2-9b.log").read_text()


def test_gemma2_case_report_fails_when_the_paths_disagree_or_a_stage_failed(tmp_path):
    from bench import gpu_family

    check = {"passed": False, "serving_backend": "triton", "max_rel_l2": 0.2, "top1": 0.5}
    check |= {"prompt_lengths": [4396, 37, 5], "sliding_windows": [4096]}
    (tmp_path / "gpu_family_g.json").write_text(json.dumps(check))
    run = {"batch": 1, "output_tok_s": 50.0, "decode_ms_step_median": 20.0, "ttft_ms_median": 30.0}
    (tmp_path / "gpu_engine_g.json").write_text(json.dumps({"hbm_datasheet_gbs": 3350, "runs": [run]}))
    (tmp_path / "gpu_model_g.json").write_text(json.dumps({"weight_bytes": 18_483_411_968}))
    argv = ["report", "--results", str(tmp_path), "--case", "g", "--stage", "build=0", "--stage", "check=1"]
    assert gpu_family.main(argv) == 2  # the check stage itself exited non-zero
    assert gpu_family.main([*argv[:-1], "check=0"]) == 1  # its record says the paths disagree
    summary = json.loads((tmp_path / "gpu_check_g.json").read_text())
    assert summary["decode"][0]["weights_gbs"] == pytest.approx(924.2, abs=0.1)  # 18.48 GB read per 20 ms step
    check["passed"] = True
    (tmp_path / "gpu_family_g.json").write_text(json.dumps(check))
    assert gpu_family.main([*argv[:-1], "check=0"]) == 0
