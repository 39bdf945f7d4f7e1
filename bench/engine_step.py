"""Offline engine benchmark: one in-process Engine, N requests x M tokens at a fixed concurrency, no HTTP.

Variants (sampling settings, torch threads, environment toggles, module constants) alternate within each
round, so a shared machine's noise hits them alike; the table shows each variant's median over rounds:
output tok/s, wall ms per step, median ms of a decode-only step, and process CPU ms per step.

  python -m bench.engine_step --model tiny --concurrency 32 --requests 64 --max-tokens 128 --rounds 3 \
      --variant greedy:temperature=0 --variant topp:temperature=1,top_p=0.9 --variant t1:threads=1
  python -m bench.engine_step --model llama-100m --prompt-tokens 128 --variant cpu:backend=cpu \
      --variant torch:backend=torch   # the C++ CPU kernels against torch's SDPA path
"""

from __future__ import annotations

import argparse
import ast
import importlib
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from model_handler.config import EngineConfig
from model_handler.engine import Engine
from model_handler.engine_protocol import EngineRequest
from model_handler.sampling_params import SamplingParams
from model_handler.tiny_model import PRESETS, default_model_dir

SAMPLING_KEYS = {"temperature": float, "top_p": float, "top_k": int, "repetition_penalty": float}


@dataclass(slots=True)
class Variant:
    """One configuration to time: sampling settings, torch threads, environment variables set around it."""

    name: str
    sampling: dict[str, float | int] = field(default_factory=dict)
    threads: int | None = None
    attrs: dict[str, object] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    backend: str | None = None
    """ATTENTION_BACKEND of the engine it runs on (None: the device's default); each backend gets its own engine."""

    @classmethod
    def parse(cls, text: str) -> Variant:
        """`name:key=value,...`; keys: temperature, top_p, top_k, repetition_penalty, threads, backend (torch, cpu
        or triton), env.NAME (set around the run), attr.MODULE.NAME (a module constant set around the run, value a
        Python literal), e.g. attr.model_handler.layers.cpu_linear.enabled=False."""
        name, _, spec = text.partition(":")
        variant = cls(name or "default", {"temperature": 0.0})
        for item in filter(None, spec.split(",")):
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"variant {text!r}: expected key=value, got {item!r}")
            if key in SAMPLING_KEYS:
                variant.sampling[key] = SAMPLING_KEYS[key](value)
            elif key == "threads":
                variant.threads = int(value)
            elif key == "backend":
                variant.backend = value
            elif key.startswith("attr."):
                variant.attrs[key[5:]] = ast.literal_eval(value)
            elif key.startswith("env."):
                variant.env[key[4:]] = value
            else:
                raise ValueError(f"variant {text!r}: unknown key {key!r}")
        return variant


@dataclass(slots=True)
class RunResult:
    num_tokens: int
    tokens_per_s: float
    ms_per_step: float
    ms_per_decode_step: float
    cpu_ms_per_step: float
    """Process CPU time per step: less swayed by other processes than wall time (with 1 thread, the work)."""


def _set_attr(path: str, value: object) -> object:
    """Set `package.module.NAME` to value; returns the old value."""
    module_name, _, name = path.rpartition(".")
    module = importlib.import_module(module_name)
    old = getattr(module, name)
    setattr(module, name, value)
    return old


def make_prompts(num: int, length: int, vocab_size: int, seed: int) -> list[list[int]]:
    """Distinct random prompts (ids past the special tokens), so the prefix cache never shares one."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab_size, (num, length), generator=gen).tolist()


def run_workload(
    engine: Engine, prompts: list[list[int]], max_tokens: int, concurrency: int, sampling: dict, tag: str
) -> RunResult:
    """Closed loop: keep `concurrency` requests running until every prompt has produced `max_tokens`."""
    params = SamplingParams(max_tokens=max_tokens, min_tokens=max_tokens, ignore_eos=True, **sampling)
    pending = [EngineRequest(f"{tag}-{i}", p, params) for i, p in enumerate(prompts)]
    pending.reverse()
    running = num_tokens = num_steps = 0
    decode_times: list[float] = []
    started, cpu_started = time.perf_counter(), time.process_time()
    while pending or running:
        num_added = 0
        while pending and running < concurrency:
            engine.add_request(pending.pop())
            running += 1
            num_added += 1
        t0 = time.perf_counter()
        outputs = engine.step()
        elapsed = time.perf_counter() - t0
        num_steps += 1
        if not num_added:  # no request joined: decodes (a prefill spilling into this step is an outlier)
            decode_times.append(elapsed)
        for out in outputs:
            num_tokens += len(out.new_token_ids)
            running -= out.finished
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    decode_ms = 1e3 * statistics.median(decode_times) if decode_times else float("nan")
    return RunResult(num_tokens, num_tokens / wall, 1e3 * wall / num_steps, decode_ms, 1e3 * cpu / num_steps)


def build_engine(model_dir: Path, args: argparse.Namespace, backend: str | None = None) -> Engine:
    config = EngineConfig(
        model_dir=model_dir,
        max_model_len=args.prompt_tokens + args.max_tokens + 16,
        max_num_seqs=max(args.concurrency, 1),
        max_num_prefill_tokens=max(2048, args.concurrency),
        block_size=args.block_size,
        enable_prefix_caching=False,
        attention_backend=backend,
    )
    return Engine(config)


def run_variant(
    engine: Engine, variant: Variant, prompts: list[list[int]], args: argparse.Namespace, tag: str
) -> RunResult:
    """One closed-loop run with the variant's threads, module constants and environment, restored after."""
    saved_env = {k: os.environ.get(k) for k in variant.env}
    os.environ.update(variant.env)
    threads = torch.get_num_threads()
    torch.set_num_threads(variant.threads or threads)
    saved_attrs = {path: _set_attr(path, value) for path, value in variant.attrs.items()}
    try:
        return run_workload(engine, prompts, args.max_tokens, args.concurrency, variant.sampling, tag)
    finally:
        for path, value in saved_attrs.items():
            _set_attr(path, value)
        torch.set_num_threads(threads)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def print_table(args: argparse.Namespace, num_requests: int, results: dict[str, list[RunResult]]) -> None:
    print(
        f"\nmodel={args.model} concurrency={args.concurrency} requests={num_requests} "
        f"prompt={args.prompt_tokens} new={args.max_tokens} block={args.block_size} "
        f"rounds={args.rounds}"
    )
    print(f"{'variant':>12} {'tok/s':>8} {'ms/step':>8} {'ms/decode':>9} {'cpu-ms/step':>11}   (medians)")
    for name, runs in results.items():
        print(
            f"{name:>12} {statistics.median(r.tokens_per_s for r in runs):8.0f} "
            f"{statistics.median(r.ms_per_step for r in runs):8.2f} "
            f"{statistics.median(r.ms_per_decode_step for r in runs):9.2f} "
            f"{statistics.median(r.cpu_ms_per_step for r in runs):11.2f}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help=f"a preset ({', '.join(PRESETS)}) or a model folder")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--requests", type=int, default=0, help="requests per run (default: 2 x concurrency)")
    parser.add_argument("--prompt-tokens", type=int, default=30)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variant", action="append", default=[], help="name:key=value,... (repeatable)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads for variants that set none")
    parser.add_argument(
        "--keep-freed-memory", action="store_true", help="glibc keeps freed memory mapped, as the engine process does"
    )
    args = parser.parse_args(argv)
    if args.keep_freed_memory:
        from model_handler.cpu_threads import keep_freed_memory_mapped

        keep_freed_memory_mapped()
    if args.threads:
        torch.set_num_threads(args.threads)

    model_dir = default_model_dir(args.model) if args.model in PRESETS else Path(args.model)
    variants = [Variant.parse(v) for v in args.variant] or [Variant.parse("greedy:")]
    backends = dict.fromkeys(v.backend for v in variants)  # distinct, in order
    engines = {backend: build_engine(model_dir, args, backend) for backend in backends}
    vocab_size = next(iter(engines.values())).model_config.vocab_size
    num_requests = args.requests or 2 * args.concurrency
    # A short warm-up run per engine: first-call costs (allocator, kernels' lazy init) stay out of the first variant.
    warmup = make_prompts(args.concurrency, args.prompt_tokens, vocab_size, 10_000)
    for engine in engines.values():
        run_workload(engine, warmup, 8, args.concurrency, {"temperature": 0.0}, "warmup")
    results: dict[str, list[RunResult]] = {v.name: [] for v in variants}
    for round_index in range(args.rounds):
        for variant in variants if round_index % 2 == 0 else variants[::-1]:
            prompts = make_prompts(num_requests, args.prompt_tokens, vocab_size, round_index)
            result = run_variant(engines[variant.backend], variant, prompts, args, f"r{round_index}-{variant.name}")
            results[variant.name].append(result)
            print(
                f"round {round_index} {variant.name:>12}: {result.tokens_per_s:8.0f} tok/s  "
                f"{result.ms_per_step:6.2f} ms/step  {result.ms_per_decode_step:6.2f} ms/decode-step  "
                f"{result.cpu_ms_per_step:6.2f} cpu-ms/step",
                flush=True,
            )
    print_table(args, num_requests, results)


if __name__ == "__main__":
    main()
