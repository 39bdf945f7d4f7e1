"""Where a decode step's time goes on one GPU: the host phases of `Engine.step`, the GPU time of the
captured forward alone, and the kernels (torch.profiler) of a few steady decode steps.

  python -m bench.gpu_profile MODEL_DIR --out profile.json [--batch-sizes 1,32] [--trace trace.json.gz]

A step's wall time minus the GPU's busy time is the bubble the host leaves between kernels: the part
that overlapping host work with the GPU, or fewer launches, could win back.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from bench.gpu_engine import device_record, make_prompts, vocab_size_of

TOP_KERNELS = 15


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 32])
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--steps", type=int, default=40, help="timed decode steps per batch size")
    parser.add_argument("--profiled-steps", type=int, default=8)
    parser.add_argument("--trace", type=Path, help="chrome trace (gzip) of the first batch size's profiled steps")
    return parser.parse_args(argv)


class PhaseTimer:
    """Wraps methods so each call's host wall time lands in a per-phase list (cleared with `reset`)."""

    def __init__(self) -> None:
        self.times: dict[str, list[float]] = defaultdict(list)

    def wrap(self, owner: object, attr: str, phase: str) -> None:
        original = getattr(owner, attr)

        def timed(*a, **kw):
            began = time.perf_counter()
            try:
                return original(*a, **kw)
            finally:
                self.times[phase].append(time.perf_counter() - began)

        setattr(owner, attr, timed)

    def reset(self) -> None:
        self.times.clear()

    def medians_ms(self) -> dict[str, float]:
        return {k: round(1e3 * statistics.median(v), 3) for k, v in self.times.items() if v}


def cuda_ms(fn, repeats: int) -> float:
    """GPU milliseconds per call of `fn` run back to back (median of 3 timed batches after one warm-up)."""
    import torch

    fn()
    torch.cuda.synchronize()
    results = []
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            fn()
        end.record()
        end.synchronize()
        results.append(start.elapsed_time(end) / repeats)
    return round(statistics.median(results), 4)


def sync(engine) -> None:
    import torch

    if engine.model_runner.device.type == "cuda":
        torch.cuda.synchronize()


def kernel_table(prof, steps: int) -> tuple[float, list[dict[str, Any]]]:
    """(GPU busy ms per step, the heaviest kernels) from the profiler's device-side events."""
    from torch.autograd import DeviceType

    per_name: dict[str, list[float]] = defaultdict(list)
    for event in prof.events():
        if event.device_type == DeviceType.CUDA:
            per_name[event.name].append(event.time_range.elapsed_us())
    busy_ms = sum(sum(v) for v in per_name.values()) / 1e3 / steps
    rows = sorted(per_name.items(), key=lambda kv: -sum(kv[1]))
    table = [
        {
            "kernel": name[:110],
            "calls_per_step": round(len(t) / steps, 2),
            "us_per_step": round(sum(t) / steps, 1),
            "us_mean": round(statistics.mean(t), 2),
        }
        for name, t in rows[:TOP_KERNELS]
    ]
    return round(busy_ms, 3), table


def profile_batch(engine, timer: PhaseTimer, batch: int, args: argparse.Namespace, trace: Path | None) -> dict:
    from model_handler.engine_protocol import EngineRequest
    from model_handler.sampling_params import SamplingParams

    vocab = vocab_size_of(args.model_dir)
    total_steps = args.steps + args.profiled_steps + 8
    params = SamplingParams(max_tokens=total_steps + 4, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(make_prompts(batch, args.prompt_tokens, vocab, 77 + batch)):
        engine.add_request(EngineRequest(f"p{batch}-{i}", prompt, params))
    while len(engine.scheduler.waiting) or any(
        s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.running
    ):
        engine.step()
    for _ in range(4):
        engine.step()
    sync(engine)
    timer.reset()
    walls = []
    for _ in range(args.steps):
        began = time.perf_counter()
        engine.step()
        walls.append(time.perf_counter() - began)
    phases = timer.medians_ms()
    from torch.profiler import ProfilerActivity, profile

    on_gpu = engine.model_runner.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as prof:
        for _ in range(args.profiled_steps):
            engine.step()
        sync(engine)
    busy_ms, kernels = kernel_table(prof, args.profiled_steps) if on_gpu else (None, [])
    if trace is not None:
        raw = trace.with_suffix("")
        prof.export_chrome_trace(str(raw))
        with open(raw, "rb") as src, gzip.open(trace, "wb") as dst:
            shutil.copyfileobj(src, dst)
        raw.unlink()
    runner = engine.model_runner
    record: dict[str, Any] = {
        "batch": batch,
        "step_wall_ms_median": round(1e3 * statistics.median(walls), 3),
        "host_phases_ms_median": phases,
        "gpu_busy_ms_per_step": busy_ms,
        "kernels": kernels,
    }
    graphs = runner.graph_runner
    if graphs is not None:
        size = min(s for s in graphs.batch_sizes if s >= batch)
        record["graph_replay_ms"] = cuda_ms(graphs.graphs[size].replay, 20)
        hidden = graphs.hidden[:batch]
        record["lm_head_ms"] = cuda_ms(lambda: runner.model.compute_logits(hidden), 20)
    while engine.has_unfinished_requests():
        engine.step()
    step = record["step_wall_ms_median"]
    busy = f"GPU busy {busy_ms} ms/step ({busy_ms / step:.0%} of the step)" if busy_ms is not None else "no GPU"
    print(
        f"b={batch}: step {step} ms, {busy}, graph replay {record.get('graph_replay_ms')} ms, LM head "
        f"{record.get('lm_head_ms')} ms, async scheduling {engine.config.async_scheduling}",
        flush=True,
    )
    print(f"  host phases (median ms): {phases}", flush=True)
    for row in kernels:
        print(f"  {row['us_per_step']:>9} us/step {row['calls_per_step']:>7} calls  {row['kernel']}", flush=True)
    return record


def main(argv: list[str] | None = None) -> int:
    import logging

    from model_handler.config import EngineConfig
    from model_handler.engine import Engine

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    environ = dict(os.environ)
    environ["HF_MODEL_ID"] = str(args.model_dir)
    environ.setdefault("DTYPE", args.dtype)
    environ.setdefault("MAX_BATCH_SIZE", str(max(args.batch_sizes)))
    engine = Engine(EngineConfig.from_env(environ, device=args.device))
    timer = PhaseTimer()
    timer.wrap(engine.scheduler, "schedule", "schedule")
    timer.wrap(engine.model_runner, "prepare", "prepare")
    timer.wrap(engine.model_runner, "run", "launch_forward")
    timer.wrap(engine.sampler, "choose", "sample")
    if engine.config.async_scheduling:  # tokens are read (the host waits for the GPU) one step later
        timer.wrap(engine, "_read", "read_tokens_and_update")
        timer.wrap(engine.scheduler, "advance", "advance")
    else:
        timer.wrap(engine.scheduler, "update_from_output", "update")
    record: dict[str, Any] = {
        **device_record(args.device),
        "engine": str(engine.info()),
        "async_scheduling": engine.config.async_scheduling,
        "runs": [],
    }
    for i, batch in enumerate(args.batch_sizes):
        record["runs"].append(profile_batch(engine, timer, batch, args, args.trace if i == 0 else None))
    args.out.write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
