"""Grammar-constrained decoding on one in-process Engine (no HTTP): the throughput of JSON-schema streams against
unconstrained ones, and the unconstrained streams' inter-token latency while new schemas compile.

Throughput: N constrained streams (greedy, one JSON schema) against N unconstrained ones, closed loop; the
grammar may end a stream before max_tokens, so tokens/s and the median decode-only step are both reported.
Latency: N unconstrained streams decode while K constrained requests join; in A their K schemas are compiled
already (cached), in B they are new, so the only difference is K compiles running beside the step loop.
A and B alternate within the run (A B, B A, ...), so a shared machine's noise hits them alike.

  python -m bench.grammar --model llama-100m --rounds 4 --out bench/results/cpu-llama100m-grammar-32streams.json
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


@dataclass(slots=True)
class LatencyRun:
    itl_p50_ms: float
    itl_p99_ms: float
    itl_max_ms: float
    """Over the unconstrained streams' gaps between tokens, from the joiners' arrival to the streams' end."""
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
    started = time.perf_counter()
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
    wall = time.perf_counter() - started
    return ThroughputRun(len(prompts), num_tokens, num_tokens / wall, 1e3 * statistics.median(decode_times))


def run_latency(
    engine: Engine, prompts: list[list[int]], joiners: list[Constraint], args: argparse.Namespace, tag: str
) -> LatencyRun:
    """`args.streams` unconstrained streams decode; after `args.warm_steps` steps the joiners arrive."""
    stream_params = SamplingParams(max_tokens=args.max_tokens, min_tokens=args.max_tokens, temperature=0.0)
    for i, prompt in enumerate(prompts):
        engine.add_request(EngineRequest(f"{tag}-s{i}", prompt, stream_params))
    last_token_at: dict[str, float] = {}
    gaps: list[float] = []
    joined_at = 0.0
    num_steps = steps_while_compiling = 0
    first_step_of: dict[str, float] = {}
    compiles_before = engine.grammar_compiler.num_compiles
    while engine.has_unfinished_requests():
        if num_steps == args.warm_steps:
            joined_at = time.perf_counter()
            for j, constraint in enumerate(joiners):
                joiner_params = SamplingParams(max_tokens=args.joiner_tokens, temperature=0.0, constraint=constraint)
                engine.add_request(EngineRequest(f"{tag}-j{j}", [5 + j, 6, 7, 8], joiner_params))
        compiling = num_steps >= args.warm_steps and len(engine.grammar_waitlist) > 0
        outputs = step_until_ready(engine)
        now = time.perf_counter()
        num_steps += 1
        steps_while_compiling += compiling
        for out in outputs:
            if "-j" in out.request_id:
                first_step_of.setdefault(out.request_id, now)
                continue
            if joined_at and out.request_id in last_token_at:
                gaps.append(now - last_token_at[out.request_id])
            last_token_at[out.request_id] = now
    gaps.sort()
    waits = [at - joined_at for at in first_step_of.values()]
    return LatencyRun(
        1e3 * gaps[len(gaps) // 2],
        1e3 * gaps[min(len(gaps) - 1, int(0.99 * len(gaps)))],
        1e3 * gaps[-1],
        len(gaps),
        engine.grammar_compiler.num_compiles - compiles_before,
        steps_while_compiling,
        1e3 * max(waits),
    )


def build_engine(model_dir: Path, args: argparse.Namespace) -> Engine:
    config = EngineConfig(
        model_dir=model_dir,
        max_model_len=args.prompt_tokens + args.max_tokens + 16,
        max_num_seqs=args.streams + args.compiles,
        max_num_prefill_tokens=2048,
        block_size=16,
        enable_prefix_caching=False,
    )
    return Engine(config)


def _median(runs: list, name: str) -> float:
    return statistics.median(getattr(run, name) for run in runs)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-100m", help=f"a preset ({', '.join(PRESETS)}) or a model folder")
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--requests", type=int, default=0, help="requests per throughput run (default: 2 x streams)")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--compiles", type=int, default=16, help="new schemas compiled in the latency runs")
    parser.add_argument("--joiner-tokens", type=int, default=8, help="tokens each constrained joiner generates")
    parser.add_argument("--warm-steps", type=int, default=8, help="stream steps before the joiners arrive")
    parser.add_argument("--rounds", type=int, default=3)
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
                    f"{run.ms_per_decode_step:6.1f} ms/decode-step ({run.num_tokens} tokens)",
                    flush=True,
                )
            streams = make_prompts(args.streams, args.prompt_tokens, vocab_size, 100 + r)
            for name in ["cached_schemas", "new_schemas"] if r % 2 == 0 else ["new_schemas", "cached_schemas"]:
                fresh = [record_schema(1000 + r * args.compiles + j) for j in range(args.compiles)]
                run = run_latency(engine, streams, cached if name == "cached_schemas" else fresh, args, f"l{r}{name}")
                latency[name].append(run)
                print(
                    f"round {r} latency {name:>14}: ITL p50 {run.itl_p50_ms:6.1f} p99 {run.itl_p99_ms:6.1f} "
                    f"max {run.itl_max_ms:6.1f} ms, {run.steps_while_compiling} steps while compiling, "
                    f"joiners' first token <= {run.joiner_first_token_ms_max:.1f} ms",
                    flush=True,
                )

    ratio = _median(throughput["json_schema"], "tokens_per_s") / _median(throughput["unconstrained"], "tokens_per_s")
    step_ratio = _median(throughput["unconstrained"], "ms_per_decode_step") / _median(
        throughput["json_schema"], "ms_per_decode_step"
    )
    p99_ratio = _median(latency["new_schemas"], "itl_p99_ms") / _median(latency["cached_schemas"], "itl_p99_ms")
    summary = {
        "throughput_ratio": ratio,
        "decode_step_ratio": step_ratio,
        "throughput_target": THROUGHPUT_TARGET,
        "throughput_pass": ratio >= THROUGHPUT_TARGET,
        "itl_p99_ratio_new_over_cached": p99_ratio,
        "medians": {
            name: {field: _median(runs, field) for field in runs[0].__dataclass_fields__}
            for name, runs in {**throughput, **latency}.items()
        },
    }
    print(
        f"\nconstrained / unconstrained: {ratio:.2f} tok/s ({'PASS' if ratio >= THROUGHPUT_TARGET else 'FAIL'} "
        f">= {THROUGHPUT_TARGET}), {step_ratio:.2f} decode-step speed; ITL p99 new / cached schemas: {p99_ratio:.2f}"
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
