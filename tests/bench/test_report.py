"""Best-of-rounds selection, the CPU targets' verdicts, the table, and strict JSON out of NaN metrics."""

from __future__ import annotations

import json
import math

from bench import report
from bench.metrics import RequestResult, summarize


def make_run(server: str, concurrency: int, rate: float, ttft_ms: float, round_index: int = 0, failed: int = 0) -> dict:
    metrics = {
        "output_tokens_per_s": rate,
        "ttft_ms_p50": ttft_ms,
        "ttft_ms_p99": ttft_ms * 2,
        "itl_ms_p50": 5.0,
        "itl_ms_p99": 9.0,
        "tpot_ms_p50": 5.0,
        "num_ok": 4 - failed,
        "num_requests": 4,
        "num_failed": failed,
        "output_tokens_min": 16,
        "output_tokens_max": 16,
        "prompt_tokens_min": 64,
        "prompt_tokens_max": 64,
        "tokens_counted_by": "usage",
    }
    load = {"other_cpu_max_percent": 3.0, "loadavg_1m_start": 0.5}
    return {
        "model": "tiny",
        "server": server,
        "concurrency": concurrency,
        "round": round_index,
        "metrics": metrics,
        "load": load,
    }


def test_best_round_is_the_fastest_without_failures() -> None:
    runs = [
        make_run("ours", 8, 100.0, 50.0, 0),
        make_run("ours", 8, 300.0, 40.0, 1, failed=1),
        make_run("ours", 8, 200.0, 45.0, 2),
    ]
    assert report.best_runs(runs)[("tiny", "ours", 8)]["round"] == 2


def test_targets_compare_ours_with_the_better_transformers_mode() -> None:
    runs = [
        make_run("ours", 32, 700.0, 30.0),
        make_run("tf-serve", 32, 100.0, 900.0),
        make_run("tf-serve-cb", 32, 200.0, 120.0),
        make_run("ours", 1, 40.0, 10.0),
        make_run("tf-serve", 1, 50.0, 20.0),
        make_run("tf-serve-cb", 1, 30.0, 20.0),
    ]
    throughput, ttft, single = report.evaluate_targets(runs)
    assert throughput["ratio"] == 3.5 and throughput["baseline"] == 200.0 and throughput["verdict"] == "PASS"
    assert ttft["ratio"] == 0.25 and ttft["baseline"] == 120.0 and ttft["verdict"] == "PASS"
    assert single["ratio"] == 0.8 and single["verdict"] == "FAIL"
    assert "FAIL" in report.format_targets(report.evaluate_targets(runs))


def test_each_of_our_precisions_meets_the_best_transformers_mode_and_dtype() -> None:
    runs = [
        make_run("ours", 32, 900.0, 30.0),
        make_run("ours-fp32", 32, 600.0, 60.0),
        make_run("tf-serve-cb", 32, 200.0, 150.0),
        make_run("tf-serve-cb-bf16", 32, 250.0, 100.0),
    ]
    targets = report.evaluate_targets(runs)
    by_server = {(t["server"], t["target"].split(":")[1].split()[0]): t for t in targets if "32 streams" in t["target"]}
    assert by_server["ours", "output"]["baseline"] == 250.0 and by_server["ours", "output"]["ratio"] == 3.6
    assert by_server["ours", "TTFT"]["baseline"] == 100.0 and by_server["ours", "TTFT"]["verdict"] == "PASS"
    assert by_server["ours-fp32", "output"]["ratio"] == 2.4 and by_server["ours-fp32", "output"]["verdict"] == "FAIL"
    assert by_server["ours-fp32", "TTFT"]["ratio"] == 0.6 and by_server["ours-fp32", "TTFT"]["verdict"] == "FAIL"
    assert len(targets) == 6  # three targets for each of our two servers; the 1-stream ones n/a here


def test_bf16_transformers_modes_ask_for_bf16() -> None:
    from bench.servers import SERVERS, CbSettings, _command

    cb = CbSettings(num_blocks=10)
    argv, _ = _command(SERVERS["tf-serve-cb-bf16"], "/m", 1234, cb)
    assert "--continuous-batching" in argv and argv[argv.index("--dtype") + 1] == "bfloat16"
    argv, _ = _command(SERVERS["tf-serve"], "/m", 1234, cb)
    assert "--dtype" not in argv and "--continuous-batching" not in argv
    _, env = _command(SERVERS["ours-fp32"], "/m", 1234, cb)
    assert env["DTYPE"] == "float32"
    _, env = _command(SERVERS["ours-torch-attn"], "/m", 1234, cb)
    assert env["ATTENTION_BACKEND"] == "torch" and "DTYPE" not in env


def test_each_metric_takes_its_own_best_round_for_every_server() -> None:
    """A baseline's TTFT is its fastest round, not the TTFT of its best-throughput round; failed rounds count
    for nothing."""
    runs = [
        make_run("ours", 32, 700.0, 90.0, 0),
        make_run("ours", 32, 600.0, 60.0, 1),
        make_run("tf-serve-cb", 32, 200.0, 400.0, 0),
        make_run("tf-serve-cb", 32, 150.0, 240.0, 1),
        make_run("tf-serve-cb", 32, 900.0, 10.0, 2, failed=1),
    ]
    throughput, ttft, _ = report.evaluate_targets(runs)
    assert (throughput["ours"], throughput["baseline"]) == (700.0, 200.0)
    assert (ttft["ours"], ttft["baseline"]) == (60.0, 240.0) and ttft["ratio"] == 0.25


def test_targets_without_our_server_are_not_applicable() -> None:
    runs = [make_run("tf-serve", 32, 100.0, 900.0), make_run("naive", 1, 10.0, 5.0)]
    assert {t["verdict"] for t in report.evaluate_targets(runs)} == {"n/a"}


def test_table_has_a_row_per_point_and_lists_every_round() -> None:
    runs = [make_run("naive", 1, 10.0, 5.0, 0), make_run("naive", 1, 12.0, 5.0, 1), make_run("naive", 8, 30.0, 50.0)]
    table = report.format_table(runs)
    rows = [line for line in table.splitlines() if line.strip().startswith("tiny")]
    assert len(rows) == 2
    assert "10 12" in rows[0]


def test_metrics_without_samples_are_written_as_null(tmp_path) -> None:
    failed = RequestResult(start=0.0, end=1.0, error="HTTP 500: boom")
    metrics = summarize([failed], concurrency=1)
    assert math.isnan(metrics.ttft_ms_p50)

    path = tmp_path / "out.json"
    report.write_json(path, {"runs": [{"metrics": metrics.to_dict()}]})
    loaded = json.loads(path.read_text())  # strict JSON: NaN would not parse in most readers
    assert loaded["runs"][0]["metrics"]["ttft_ms_p50"] is None
    assert loaded["runs"][0]["metrics"]["num_failed"] == 1
