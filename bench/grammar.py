"""Grammar-constrained decoding on one in-process Engine (no HTTP): the throughput of JSON-schema streams against
unconstrained ones, and the unconstrained streams' inter-token latency while new schemas compile.

Throughput: N constrained streams (greedy, one JSON schema) against N unconstrained ones, closed loop, one run
after the other (the order alternating every round); the grammar may end a stream before max_tokens, so tokens/s,
the median decode-only step and the CPU time per token are all reported.
Latency: in one run N unconstrained streams decode while two sets of K constrained requests join, `--window-steps`
apart: one set's schemas compiled already (cached), the other's new (which comes first alternates every round).
The only difference between the two windows is K compiles running beside the step loop.
Each round gives paired ratios (B over A, measured seconds apart); the summary is their median, which a shared
machine's swings in load sway far less than a ratio of medians.

  python -m bench.grammar --model llama-100m --rounds 8 --out bench/results/cpu-llama100m-grammar-32streams.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.engine_step import make_prompts
from bench.machine import LoadMonitor, machine_info, wait_quiet
from model_handler.config import EngineConfig
from model_handler.constraints import Constraint, ConstraintKind
from model_handler.engine import Engine
from model_handler.engine_protocol import EngineRequest
from model_handler.sampling_params import SamplingParams
from model_handler.tiny_model import PRESETS, default_model_dir

THROUGHPUT_TARGET = 0.8
"""Constrained tokens/s at least this share of unconstrained (issue 16)."""


def record_schema(index: int) -> Constraint:
    """A tool-argument-sized object schema; `index` renames a property, so every index compiles anew."""
    schema = {
        "type": "object",
        "properties": {
            f"name_{index}": {"type": "string", "maxLength": 24},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "email": {"type": "string", "pattern": "[a-z]{1,12}@[a-z]{1,12}\\.(com|org|net)"},
            "status": {"enum": ["active", "inactive", "pending"]},
            "address": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 20},
                    "zip": {"type": "string", "pattern": "[0-9]{5}"},
                },
                "required": ["city", "zip"],
            },
            "scores": {"type": "array", "items": {"type": "number"}},
            "notes": {"type": "array", "items": {"type": "string", "maxLength": 32}},
        },
        "required": [f"name_{index}", "age", "status", "address", "scores", "notes"],
    }
    return Constraint(ConstraintKind.JSON_SCHEMA, json.dumps(schema))


@dataclass(slots=True)
class ThroughputRun:
    num_requests: int
    num_tokens: int
    tokens_per_s: float
    ms_per_decode_step: float
    """Median wall time of a step in which no request joined (decodes only)."""
    cpu_ms_per_token: float
    """This process's CPU time per generated token: the work, less swayed than wall time by other processes."""


@dataclass(slots=True)
class LatencyRun:
    itl_p50_ms: float
    itl_p90_ms: float
    itl_p99_ms: float
    itl_max_ms: float
    """Over the unconstrained streams' gaps between tokens, from the joiners' arrival to the streams' end. The
    streams share every step, so a percentile of their gaps is about that percentile of the step times."""
    num_itl_samples: int
    num_compiles: int
    """Grammars compiled during the run: the joiners' count with new schemas, 0 with cached ones."""
    steps_while_compiling: int
    """Steps the loop ran while some joiner still waited for its grammar."""
    joiner_first_token_ms_max: float
    """Longest time from a joiner's add_request to its first token (its compile, if any, included)."""


def step_until_ready(engine: Engine) -> list:
    """One step, after waiting (as the engine server sleeps) while only compiling requests are left."""
    while not engine.has_ready_requests():
        time.sleep(0.0002)
    return engine.step()


def run_throughput(
    engine: Engine, prompts: list[list[int]], constraint: Constraint | None, args: argparse.Namespace, tag: str
) -> ThroughputRun:
    """Closed loop: keep `args.streams` greedy requests running until every prompt has been served."""
    params = SamplingParams(
        max_tokens=args.max_tokens, min_tokens=args.max_tokens, temperature=0.0, constraint=constraint
    )
    pending = [EngineRequest(f"{tag}-{i}", p, params) for i, p in enumerate(prompts)][::-1]
    running = num_tokens = 0
    decode_times: list[float] = []
    started, cpu_started = time.perf_counter(), time.process_time()
    while pending or running:
        num_added = 0
        while pending and running < args.streams:
            engine.add_request(pending.pop())
            running, num_added = running + 1, num_added + 1
        t0 = time.perf_counter()
        outputs = step_until_ready(engine)
        if not num_added:
            decode_times.append(time.perf_counter() - t0)
        for out in outputs:
            num_tokens += len(out.new_token_ids)
            running -= out.finished
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    return ThroughputRun(
        len(prompts), num_tokens, num_tokens / wall, 1e3 * statistics.median(decode_times), 1e3 * cpu / num_tokens
    )


def run_latency(
    engine: Engine,
    prompts: list[list[int]],
    joiner_sets: dict[str, list[Constraint]],
    args: argparse.Namespace,
    tag: str,
) -> dict[str, LatencyRun]:
    """`args.streams` unconstrained streams decode; after `args.warm_steps` steps the first set of joiners arrives,
    `args.window_steps` steps later (and once its compiles are done) the next. Each set's window is the
    `args.window_steps` steps from its arrival."""
    window = args.window_steps
    # Streams long enough for a compile that holds the next set back (on a loaded machine, with the compile threads
    # at a lower priority, for many steps); they are aborted once the last window is over.
    num_stream_tokens = stream_budget(args)
    stream_params = SamplingParams(max_tokens=num_stream_tokens, min_tokens=num_stream_tokens, temperature=0.0)
    stream_ids = [f"{tag}-s{i}" for i in range(len(prompts))]
    for request_id, prompt in zip(stream_ids, prompts):
        engine.add_request(EngineRequest(request_id, prompt, stream_params))
    names = list(joiner_sets)
    last_token_at: dict[str, float] = {}
    gaps: dict[str, list[float]] = {name: [] for name in names}
    joined_at: dict[str, float] = {}
    num_compiles = dict.fromkeys(names, 0)
    steps_while_compiling = dict.fromkeys(names, 0)
    first_token_ms: dict[str, list[float]] = {name: [] for name in names}
    started: set[str] = set()
    num_steps = window_start = 0
    current: str | None = None
    while engine.has_unfinished_requests():
        # The next set arrives `window` steps after the last, once the last set's compiles are done.
        due = num_steps >= args.warm_steps and num_steps - window_start >= window * (current is not None)
        if due and not engine.grammar_waitlist.num_compiling and len(joined_at) < len(names):
            current, window_start = names[len(joined_at)], num_steps
            joined_at[current] = time.perf_counter()
            compiles_before = engine.grammar_compiler.num_compiles
            for j, constraint in enumerate(joiner_sets[current]):
                joiner_params = SamplingParams(max_tokens=args.joiner_tokens, temperature=0.0, constraint=constraint)
                engine.add_request(EngineRequest(f"{tag}-{current}-j{j}", [5 + j, 6, 7, 8], joiner_params))
            num_compiles[current] = engine.grammar_compiler.num_compiles - compiles_before
        in_window = current is not None and num_steps - window_start < window
        if in_window and engine.grammar_waitlist.num_compiling:
            steps_while_compiling[current] += 1
        if current == names[-1] and not in_window and stream_ids:
            engine.abort_requests(stream_ids)  # the last window is over
            stream_ids = []
        outputs = step_until_ready(engine)
        now = time.perf_counter()
        num_steps += 1
        for out in outputs:
            if "-j" in out.request_id:
                if out.request_id not in started:
                    started.add(out.request_id)
                    name = out.request_id.split("-")[-2]
                    first_token_ms[name].append(1e3 * (now - joined_at[name]))
                continue
            if in_window and out.request_id in last_token_at and out.new_token_ids:
                gaps[current].append(now - last_token_at[out.request_id])
            last_token_at[out.request_id] = now
    runs = {}
    for name in names:
        if not gaps[name]:
            raise RuntimeError(f"the streams ended before the {name} window: raise STREAM_SLACK_STEPS")
        ordered = sorted(gaps[name])
        runs[name] = LatencyRun(
            1e3 * ordered[len(ordered) // 2],
            1e3 * ordered[int(0.9 * len(ordered))],
            1e3 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
            1e3 * ordered[-1],
            len(ordered),
            num_compiles[name],
            steps_while_compiling[name],
            max(first_token_ms[name]),
        )
    return runs


STREAM_SLACK_STEPS = 512
"""Steps the latency run's streams can go on beyond their two windows while a set's compiles hold the next back."""


def stream_budget(args: argparse.Namespace) -> int:
    """Tokens each latency-run stream may generate: its warm-up, two windows and the slack."""
    return args.warm_steps + 2 * args.window_steps + STREAM_SLACK_STEPS


def build_engine(model_dir: Path, args: argparse.Namespace) -> Engine:
    config = EngineConfig(
        model_dir=model_dir,
        max_model_len=args.prompt_tokens + max(args.max_tokens, stream_budget(args)) + 16,
        max_num_seqs=args.streams + args.compiles,
        max_num_prefill_tokens=2048,
        block_size=16,
        enable_prefix_caching=False,
    )
    return Engine(config)


def _median(runs: list, name: str) -> float:
    return statistics.median(getattr(run, name) for run in runs)


def _paired(b_runs: list, a_runs: list, ratio) -> float:
    """The median over rounds of each round's ratio of B's run to A's (run seconds apart)."""
    return statistics.median(ratio(b, a) for b, a in zip(b_runs, a_runs, strict=True))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-100m", help=f"a preset ({', '.join(PRESETS)}) or a model folder")
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--requests", type=int, default=0, help="requests per throughput run (default: 2 x streams)")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--compiles", type=int, default=16, help="new schemas compiled in the latency runs")
    parser.add_argument("--joiner-tokens", type=int, default=8, help="tokens each constrained joiner generates")
    parser.add_argument("--warm-steps", type=int, default=8, help="stream steps before the first joiners arrive")
    parser.add_argument("--window-steps", type=int, default=24, help="stream steps from one set of joiners to the next")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument(
        "--wait-quiet", type=float, default=0.0, help="first wait up to this many seconds for a quiet machine"
    )
    parser.add_argument("--out", type=Path, help="write the results as JSON")
    args = parser.parse_args(argv)

    model_dir = default_model_dir(args.model) if args.model in PRESETS else Path(args.model)
    load = wait_quiet(args.wait_quiet)
    engine = build_engine(model_dir, args)
    vocab_size = engine.model_config.vocab_size
    shared = record_schema(-1)
    cached = [record_schema(j) for j in range(args.compiles)]
    for constraint in [shared, *cached]:  # warm-up: the tokenizer load and the A variant's compiles
        engine.grammar_compiler.submit(constraint).result()
    warmup = make_prompts(args.streams, args.prompt_tokens, vocab_size, 10_000)
    run_throughput(engine, warmup, shared, argparse.Namespace(**{**vars(args), "max_tokens": 8}), "warmup")

    num_requests = args.requests or 2 * args.streams
    throughput: dict[str, list[ThroughputRun]] = {"unconstrained": [], "json_schema": []}
    latency: dict[str, list[LatencyRun]] = {"cached_schemas": [], "new_schemas": []}
    with LoadMonitor(load):
        for r in range(args.rounds):
            order = ["unconstrained", "json_schema"] if r % 2 == 0 else ["json_schema", "unconstrained"]
            prompts = make_prompts(num_requests, args.prompt_tokens, vocab_size, r)
            for name in order:
                run = run_throughput(engine, prompts, shared if name == "json_schema" else None, args, f"t{r}{name}")
                throughput[name].append(run)
                print(
                    f"round {r} throughput {name:>13}: {run.tokens_per_s:7.0f} tok/s "
                    f"{run.ms_per_decode_step:6.1f} ms/decode-step {run.cpu_ms_per_token:5.1f} cpu-ms/token "
                    f"({run.num_tokens} tokens)",
                    flush=True,
                )
            streams = make_prompts(args.streams, args.prompt_tokens, vocab_size, 100 + r)
            fresh = [record_schema(1000 + r * args.compiles + j) for j in range(args.compiles)]
            sets = {"cached_schemas": cached, "new_schemas": fresh}
            if r % 2:
                sets = dict(reversed(sets.items()))
            for name, run in run_latency(engine, streams, sets, args, f"l{r}").items():
                latency[name].append(run)
                print(
                    f"round {r} latency {name:>14}: ITL p50 {run.itl_p50_ms:6.1f} p90 {run.itl_p90_ms:6.1f} "
                    f"p99 {run.itl_p99_ms:6.1f} max {run.itl_max_ms:6.1f} ms, {run.num_compiles} compiles, "
                    f"{run.steps_while_compiling} steps while compiling, "
                    f"joiners' first token <= {run.joiner_first_token_ms_max:.1f} ms",
                    flush=True,
                )

    constrained, free = throughput["json_schema"], throughput["unconstrained"]
    ratio = _paired(constrained, free, lambda b, a: b.tokens_per_s / a.tokens_per_s)
    step_ratio = _paired(constrained, free, lambda b, a: a.ms_per_decode_step / b.ms_per_decode_step)
    cpu_ratio = _paired(constrained, free, lambda b, a: a.cpu_ms_per_token / b.cpu_ms_per_token)
    new, cached = latency["new_schemas"], latency["cached_schemas"]
    itl_ratios = {
        f"itl_{p}_ratio_new_over_cached": _paired(
            new, cached, lambda b, a, p=p: getattr(b, f"itl_{p}_ms") / getattr(a, f"itl_{p}_ms")
        )
        for p in ("p50", "p90", "p99")
    }
    summary = {
        "throughput_ratio": ratio,
        "decode_step_speed_ratio": step_ratio,
        "cpu_per_token_ratio": cpu_ratio,
        "throughput_target": THROUGHPUT_TARGET,
        "throughput_pass": ratio >= THROUGHPUT_TARGET,
        **itl_ratios,
        "medians": {
            name: {field: _median(runs, field) for field in runs[0].__dataclass_fields__}
            for name, runs in {**throughput, **latency}.items()
        },
    }
    print(
        f"\nconstrained / unconstrained (median of the rounds' ratios): {ratio:.2f} tok/s "
        f"({'PASS' if ratio >= THROUGHPUT_TARGET else 'FAIL'} >= {THROUGHPUT_TARGET}), {step_ratio:.2f} decode-step "
        f"speed, {cpu_ratio:.2f} CPU per token; ITL new / cached schemas: "
        + ", ".join(f"{p} {itl_ratios[f'itl_{p}_ratio_new_over_cached']:.2f}" for p in ("p50", "p90", "p99"))
    )
    result = {
        "benchmark": "grammar",
        "command": [sys.executable, "-m", "bench.grammar", *(argv if argv is not None else sys.argv[1:])],
        "machine": {**machine_info(), "loadavg_at_end": list(os.getloadavg())},
        "config": {**vars(args), "model_dir": str(model_dir), "out": str(args.out) if args.out else None},
        "load": load.to_dict(),
        "summary": summary,
        "throughput": {name: [asdict(run) for run in runs] for name, runs in throughput.items()},
        "latency": {name: [asdict(run) for run in runs] for name, runs in latency.items()},
    }
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
