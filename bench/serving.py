"""CLI: start each server on loopback, drive it with the same load, print one table, save JSON.

For each model and round, every server is started alone, warmed up, measured at each concurrency, and
stopped (A/B/A/B across rounds); the table shows each point's best round.
  python -m bench.serving --models tiny --concurrency 1,8 --servers tf-serve,tf-serve-cb,naive --quick
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import loadgen, report, server_cpu
from bench.machine import QUIET_CPU_PERCENT, LoadMonitor, machine_info, wait_quiet
from bench.metrics import summarize
from bench.servers import SERVERS, CbSettings, ServerProcess, model_name_for
from bench.workload import build_prompts, chat_body

MIN_REQUESTS = 4  # one request is too few to time even a single stream
QUICK = dict(models="tiny", concurrency="1,8", prompt_tokens=64, output_tokens=16, rounds=1, waves=1)
FULL = dict(models="tiny,llama-100m", concurrency="1,8,32,64", prompt_tokens=128, output_tokens=128, rounds=3, waves=2)


def resolve_model(name: str) -> str:
    """A preset of model_handler.tiny_model ('tiny', 'llama-100m': built once into its cache) or a model folder."""
    from model_handler.tiny_model import PRESETS, default_model_dir

    if name in PRESETS:
        return str(default_model_dir(name))
    if Path(name, "config.json").is_file():
        return str(Path(name).resolve())
    raise ValueError(f"--models: {name!r} is neither a preset ({', '.join(PRESETS)}) nor a model folder")


def requests_per_point(concurrency: int, waves: int) -> int:
    return max(concurrency * waves, MIN_REQUESTS)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.serving", description=__doc__.splitlines()[0])
    parser.add_argument("--models", help=f"comma list: tiny, llama-100m or folders (default {FULL['models']})")
    parser.add_argument("--concurrency", help=f"comma list of concurrent streams (default {FULL['concurrency']})")
    parser.add_argument("--servers", default="ours,tf-serve,tf-serve-cb,naive", help=f"from {', '.join(SERVERS)}")
    parser.add_argument("--prompt-tokens", type=int, help="templated prompt length (default 128)")
    parser.add_argument("--output-tokens", type=int, help="forced output length (default 128)")
    parser.add_argument("--rounds", type=int, help="rounds per point, best one reported (default 3)")
    parser.add_argument(
        "--waves", type=int, help=f"requests per point = waves x concurrency, at least {MIN_REQUESTS} (default 2)"
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny, 1,8 streams, 64 in/16 out, 1 round")
    parser.add_argument("--out", type=Path, help="results JSON (default bench/results/tmp/serving-<date>.json)")
    parser.add_argument("--quiet-timeout", type=float, default=300.0, help="max seconds to wait for a quiet CPU")
    parser.add_argument("--no-wait-quiet", action="store_true", help="measure at once (load is still recorded)")
    parser.add_argument("--request-timeout", type=float, default=900.0)
    parser.add_argument(
        "--no-screen-prompts",
        action="store_true",
        help="keep prompts whose greedy reply is invisible (random weights; see workload.py)",
    )
    parser.add_argument("--cb-block-size", type=int, default=64)
    parser.add_argument("--cb-max-batch-tokens", type=int, default=512)
    parser.add_argument("--cb-num-blocks", type=int, default=0, help="0: sized for the largest load")
    args = parser.parse_args(argv)
    defaults = QUICK if args.quick else FULL
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.concurrency = list(dict.fromkeys(int(c) for c in str(args.concurrency).split(",")))
    args.models = args.models.split(",")
    args.servers = args.servers.split(",")
    unknown = [s for s in args.servers if s not in SERVERS]
    if unknown:
        parser.error(f"unknown servers {unknown}; choose from {', '.join(SERVERS)}")
    if min(args.concurrency) < 1 or args.rounds < 1 or args.waves < 1 or args.output_tokens < 1:
        parser.error("concurrency, rounds, waves and output tokens must be >= 1")
    if args.out is None:
        args.out = Path("bench/results/tmp") / f"serving-{time.strftime('%Y%m%d-%H%M%S')}.json"
    return args


def measure_point(
    server: ServerProcess,
    bodies: list[dict[str, Any]],
    concurrency: int,
    args: argparse.Namespace,
    count_tokens: Callable[[str], int],
) -> dict[str, Any]:
    load = wait_quiet(0.0 if args.no_wait_quiet else args.quiet_timeout)
    with LoadMonitor(load):
        cpu_before = server_cpu.cpu_seconds_by_role(server.pid)
        client_before = time.process_time()
        results = loadgen.run_load_sync(server.url + "/v1/chat/completions", bodies, concurrency, args.request_timeout)
        client_cpu = time.process_time() - client_before
        cpu = server_cpu.cpu_spent(cpu_before, server_cpu.cpu_seconds_by_role(server.pid))
    loadgen.fill_token_counts(results, count_tokens)
    metrics = summarize(results, concurrency)
    exact = metrics.num_ok > 0 and metrics.output_tokens_min == metrics.output_tokens_max == args.output_tokens
    tokens = metrics.total_output_tokens
    per_token = {role: seconds * 1e6 / tokens if tokens else None for role, seconds in cpu.items()}
    # The load generator is one Python process: near 100% of a core, it (not the server) bounds the figures.
    client_percent = 100.0 * client_cpu / metrics.duration_s if metrics.duration_s else None
    return {
        "metrics": metrics.to_dict(),
        "load": load.to_dict(),
        "output_tokens_exact": exact,
        "server_cpu_s": cpu,
        "server_cpu_us_per_output_token": per_token,
        "client_cpu_s": client_cpu,
        "client_cpu_percent_of_core": client_percent,
    }


def run_model(label: str, model_dir: str, args: argparse.Namespace, log_dir: Path, document: dict[str, Any]) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    sizes = [requests_per_point(c, args.waves) for c in args.concurrency]
    prompts = build_prompts(
        tokenizer, sum(sizes) + 2, args.prompt_tokens, model_dir=None if args.no_screen_prompts else model_dir
    )
    # Each point and the warm-up get their own prompts, so a prefix cache never sees a prompt twice.
    warmup_prompts, offset, prompts_of_point = prompts[-2:], 0, {}
    for concurrency, size in zip(args.concurrency, sizes):
        prompts_of_point[concurrency], offset = prompts[offset : offset + size], offset + size

    def count_tokens(text: str) -> int:  # for servers that report no usage
        return len(tokenizer.encode(text, add_special_tokens=False))

    cb = CbSettings(args.cb_block_size, args.cb_max_batch_tokens, args.cb_num_blocks).for_load(
        max(args.concurrency), args.prompt_tokens + args.output_tokens
    )
    for round_index in range(args.rounds):
        for name in args.servers:
            spec = SERVERS[name]
            server = ServerProcess(spec, model_dir, log_dir / f"{label}-{name}-r{round_index}.log", cb)
            document["servers"][name] = {
                "description": spec.description,
                "flavor": spec.flavor,
                "command": shlex.join(server.command),
            }
            try:
                server.start()
            except RuntimeError as exc:
                print(f"!! {label} {name} round {round_index}: did not start\n{exc}", flush=True)
                document["failures"].append(
                    {"model": label, "server": name, "round": round_index, "error": str(exc)[-2000:]}
                )
                continue
            with server:
                model_name = model_name_for(spec, model_dir)
                warmup = [chat_body(spec.flavor, model_name, p, min(4, args.output_tokens)) for p in warmup_prompts]
                loadgen.run_load_sync(server.url + "/v1/chat/completions", warmup, 1, args.request_timeout)
                for concurrency in args.concurrency:
                    bodies = [
                        chat_body(spec.flavor, model_name, p, args.output_tokens) for p in prompts_of_point[concurrency]
                    ]
                    point = measure_point(server, bodies, concurrency, args, count_tokens)
                    run = {"model": label, "server": name, "concurrency": concurrency, "round": round_index, **point}
                    document["runs"].append(run)
                    _print_point(run)
                    report.write_json(args.out, document)  # partial results survive an interrupted run


def _print_point(run: dict[str, Any]) -> None:
    m, load = run["metrics"], run["load"]
    flag = "" if run["output_tokens_exact"] else f"  !! output tokens {m['output_tokens_min']}-{m['output_tokens_max']}"
    errors = f"  !! errors: {m['errors']}" if m["errors"] else ""
    print(
        f"  {run['model']} {run['server']} c={run['concurrency']} r{run['round']}: "
        f"{m['num_ok']}/{m['num_requests']} ok, {m['output_tokens_per_s']:.1f} out tok/s, "
        f"TTFT p50 {m['ttft_ms_p50']:.1f} ms, ITL p50 {m['itl_ms_p50']:.1f} ms, "
        f"server CPU/token {_cpu_split(run['server_cpu_us_per_output_token'])}, "
        f"client CPU {run['client_cpu_percent_of_core']:.0f}% of a core, "
        f"other CPU max {load['other_cpu_max_percent']:.0f}%{flag}{errors}",
        flush=True,
    )


def _cpu_split(per_token: dict[str, float | None]) -> str:
    parts = [f"{role} {us:.0f} us" for role, us in per_token.items() if us]
    return ", ".join(parts) or "-"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind so every started server is stopped
    log_dir = Path(tempfile.mkdtemp(prefix="bench-serving-logs-"))
    models = {label: resolve_model(label) for label in args.models}
    document: dict[str, Any] = {
        "benchmark": "bench.serving",
        "command": shlex.join([sys.executable, "-m", "bench.serving", *(argv or sys.argv[1:])]),
        "machine": machine_info(),
        "config": {
            "models": models,
            "servers": args.servers,
            "concurrency": args.concurrency,
            "prompt_tokens": args.prompt_tokens,
            "output_tokens": args.output_tokens,
            "rounds": args.rounds,
            "waves": args.waves,
            "quiet_cpu_percent": QUIET_CPU_PERCENT,
            "wait_quiet": not args.no_wait_quiet,
            "greedy": True,
            "prompts_screened": not args.no_screen_prompts,
            "server_logs": str(log_dir),
        },
        "servers": {},
        "runs": [],
        "failures": [],
    }
    print(
        f"machine: {document['machine']['cpu_model']}, {document['machine']['usable_cores']} cores, "
        f"torch {document['machine']['torch']}; server logs in {log_dir}",
        flush=True,
    )
    try:
        for label, model_dir in models.items():
            run_model(label, model_dir, args, log_dir, document)
    finally:
        ServerProcess.stop_all()
        document["machine"]["loadavg_at_end"] = list(os.getloadavg())
        document["targets"] = report.evaluate_targets(document["runs"])
        report.write_json(args.out, document)
    print()
    print(report.format_table(document["runs"]))
    print()
    print(report.format_targets(document["targets"]))
    print(f"\nresults: {args.out}")
    return 1 if document["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
