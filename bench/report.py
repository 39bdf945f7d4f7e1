"""Best-of-rounds selection, the printed table, the CPU targets (ratios, PASS/FAIL), and the JSON results file."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

BASELINES = ("tf-serve", "tf-serve-cb", "tf-serve-bf16", "tf-serve-cb-bf16")
"""Every `transformers serve` mode and precision; a target's baseline is the best of those in the run."""
OURS = ("ours", "ours-fp32", "ours-torch-attn")
TARGET_CONCURRENCY = 32


def best_runs(runs: list[dict[str, Any]]) -> dict[tuple[str, str, int], dict[str, Any]]:
    """Per (model, server, concurrency): the round with the highest output tok/s among rounds without failures."""
    best: dict[tuple[str, str, int], dict[str, Any]] = {}
    for run in runs:
        key = (run["model"], run["server"], run["concurrency"])
        current = best.get(key)
        if current is None or _rank(run) > _rank(current):
            best[key] = run
    return best


def _rank(run: dict[str, Any]) -> tuple[bool, float]:
    metrics = run["metrics"]
    rate = metrics["output_tokens_per_s"]
    return metrics["num_failed"] == 0, rate if rate is not None and not math.isnan(rate) else -1.0


def _fmt(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


_COLUMNS = (
    "model",
    "server",
    "conc",
    "ok/n",
    "out tok/s",
    "TTFT p50",
    "TTFT p99",
    "ITL p50",
    "ITL p99",
    "TPOT p50",
    "out tok/req",
    "prompt tok",
    "tok/s by round",
    "other CPU%",
    "load1",
)


def format_table(runs: list[dict[str, Any]]) -> str:
    """One row per point (its best round); times in ms."""
    rounds: dict[tuple[str, str, int], list[float]] = {}
    for run in runs:
        rounds.setdefault((run["model"], run["server"], run["concurrency"]), []).append(
            run["metrics"]["output_tokens_per_s"]
        )
    rows = [_COLUMNS]
    for key, run in sorted(best_runs(runs).items()):
        m, load = run["metrics"], run["load"]
        prompt = "-" if m["prompt_tokens_min"] is None else _range(m["prompt_tokens_min"], m["prompt_tokens_max"])
        rows.append(
            (
                run["model"],
                run["server"],
                str(run["concurrency"]),
                f"{m['num_ok']}/{m['num_requests']}",
                _fmt(m["output_tokens_per_s"]),
                _fmt(m["ttft_ms_p50"]),
                _fmt(m["ttft_ms_p99"]),
                _fmt(m["itl_ms_p50"]),
                _fmt(m["itl_ms_p99"]),
                _fmt(m["tpot_ms_p50"]),
                _range(m["output_tokens_min"], m["output_tokens_max"])
                + ("" if m["tokens_counted_by"] == "usage" else "*"),
                prompt,
                " ".join(_fmt(rate, 0) for rate in rounds[key]),
                _fmt(load["other_cpu_max_percent"], 0),
                _fmt(load["loadavg_1m_start"], 2),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    lines = ["  ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    lines.append("times in ms; out tok/req marked * was re-tokenized (no usage from the server)")
    return "\n".join(lines)


def _range(low: int, high: int) -> str:
    return str(low) if low == high else f"{low}-{high}"


def evaluate_targets(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's CPU targets per model, as ratios of ours to the best `transformers serve` mode.

    "Best of three" per metric and server alike: the highest tok/s and the lowest TTFT p50 over the rounds
    without failures, so no server's TTFT is taken from a round chosen for its throughput.
    """
    targets = []
    for model in sorted({run["model"] for run in runs}):

        def metric(server: str, concurrency: int, name: str, model: str = model) -> float | None:
            values = [
                run["metrics"][name]
                for run in runs
                if (run["model"], run["server"], run["concurrency"]) == (model, server, concurrency)
                and run["metrics"]["num_failed"] == 0
                and run["metrics"]["num_ok"] > 0
                and run["metrics"][name] is not None
                and not math.isnan(run["metrics"][name])
            ]
            if not values:
                return None
            return min(values) if name.startswith("ttft") else max(values)

        def baseline(concurrency: int, name: str, pick) -> float | None:
            values = [v for s in BASELINES if (v := metric(s, concurrency, name)) is not None]
            return pick(values) if values else None

        present = {run["server"] for run in runs if run["model"] == model}
        for server in [s for s in OURS if s in present] or ["ours"]:
            checks = (
                (
                    f"{TARGET_CONCURRENCY} streams: output tok/s {server} / best tf-serve >= 3",
                    metric(server, TARGET_CONCURRENCY, "output_tokens_per_s"),
                    baseline(TARGET_CONCURRENCY, "output_tokens_per_s", max),
                    lambda r: r >= 3.0,
                ),
                (
                    f"{TARGET_CONCURRENCY} streams: TTFT p50 {server} / best tf-serve <= 1/3",
                    metric(server, TARGET_CONCURRENCY, "ttft_ms_p50"),
                    baseline(TARGET_CONCURRENCY, "ttft_ms_p50", min),
                    lambda r: r <= 1.0 / 3.0,
                ),
                (
                    f"1 stream: output tok/s {server} / best tf-serve >= 1",
                    metric(server, 1, "output_tokens_per_s"),
                    baseline(1, "output_tokens_per_s", max),
                    lambda r: r >= 1.0,
                ),
            )
            for name, ours, theirs, passes in checks:
                ratio = ours / theirs if ours is not None and theirs else None
                verdict = "n/a" if ratio is None else ("PASS" if passes(ratio) else "FAIL")
                targets.append(
                    {
                        "model": model,
                        "server": server,
                        "target": name,
                        "ours": ours,
                        "baseline": theirs,
                        "ratio": ratio,
                        "verdict": verdict,
                    }
                )
    return targets


def format_targets(targets: list[dict[str, Any]]) -> str:
    lines = [
        "CPU targets (each metric's best round per server; baseline = the best transformers serve mode and "
        "dtype in the run):"
    ]
    for t in targets:
        lines.append(
            f"  {t['verdict']:4}  {t['model']}: {t['target']}: ratio {_fmt(t['ratio'], 2)} "
            f"(ours {_fmt(t['ours'])}, baseline {_fmt(t['baseline'])})"
        )
    return "\n".join(lines)


def write_json(path: Path, document: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_finite(document), indent=2, allow_nan=False) + "\n")


def _finite(value: Any) -> Any:
    """NaN (a metric with no samples) becomes null: strict JSON has no NaN."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def main() -> None:
    """`python -m bench.report RESULTS.json`: print the table and targets of a saved run again."""
    import sys

    document = json.loads(Path(sys.argv[1]).read_text())
    print(format_table(document["runs"]))
    print(format_targets(evaluate_targets(document["runs"])))


if __name__ == "__main__":
    main()
