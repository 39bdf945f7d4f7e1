"""CPU attention kernels against the torch path, one layer at a time: the C++ decode and prefill kernels
(`model_handler/kernels/cpu_native.py`) and `kernels/reference.py` (SDPA over gathered blocks) on the same paged
cache, alternating call by call so a shared machine's noise hits both alike. Prints medians and ratios.

  python -m bench.cpu_attention                      # the default shapes, bf16 and fp32
  python -m bench.cpu_attention --dtypes bfloat16 --out bench/results/cpu-attention-kernels.json

Shapes are the layers of the two bench models and of Llama-3-8B (32 query heads, 8 kv heads, head dim 128).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from bench.machine import machine_info
from model_handler.kernels import cpu_native, reference

BLOCK_SIZE = 16


@dataclass(slots=True)
class Case:
    name: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    kind: str  # "prefill": (cached, new) tokens per sequence; "decode": one new token over `lengths` cached
    sequences: list[tuple[int, int]]


CASES = [
    Case("tiny layer, 4 prompts x 128", 4, 2, 64, "prefill", [(0, 128)] * 4),
    Case("100M layer, 4 prompts x 128", 12, 4, 64, "prefill", [(0, 128)] * 4),
    Case("100M layer, 1 prompt x 512", 12, 4, 64, "prefill", [(0, 512)]),
    Case("100M layer, 512-token chunk after 1536 cached", 12, 4, 64, "prefill", [(1536, 512)]),
    Case("100M layer, 1 prompt x 2048", 12, 4, 64, "prefill", [(0, 2048)]),
    Case("Llama-3-8B layer, 4 prompts x 128", 32, 8, 128, "prefill", [(0, 128)] * 4),
    Case("100M layer, 32 decode rows x 128-256", 12, 4, 64, "decode", [(128 + 4 * i, 1) for i in range(32)]),
    Case("Llama-3-8B layer, 32 decode rows x 128-256", 32, 8, 128, "decode", [(128 + 4 * i, 1) for i in range(32)]),
    Case("100M layer, 1 decode row x 2000", 12, 4, 64, "decode", [(1999, 1)]),
    Case("Llama-3-8B layer, 1 decode row x 4000", 32, 8, 128, "decode", [(3999, 1)]),
]


@dataclass(slots=True)
class Row:
    case: str
    dtype: str
    kernel_us: float
    torch_us: float
    speedup: float
    gflops_kernel: float
    max_abs_diff: float


def paged_inputs(case: Case, dtype: torch.dtype, seed: int = 0) -> dict:
    """A cache holding every sequence's tokens in shuffled blocks, the queries of their new tokens."""
    gen = torch.Generator().manual_seed(seed)
    lengths = [cached + new for cached, new in case.sequences]
    blocks = [-(-length // BLOCK_SIZE) for length in lengths]
    num_blocks = sum(blocks) + 1
    order = torch.randperm(num_blocks, generator=gen).to(torch.int32)
    tables = torch.zeros(len(lengths), max(blocks), dtype=torch.int32)
    taken = 0
    for i, count in enumerate(blocks):
        tables[i, :count] = order[taken : taken + count]
        taken += count
    shape = (num_blocks, BLOCK_SIZE, case.num_kv_heads, case.head_dim)
    new_tokens = sum(new for _, new in case.sequences)
    starts = torch.tensor([0] + [new for _, new in case.sequences]).cumsum(0).to(torch.int32)
    return {
        "query": torch.randn(new_tokens, case.num_heads, case.head_dim, generator=gen).to(dtype),
        "k_cache": torch.randn(shape, generator=gen).to(dtype),
        "v_cache": torch.randn(shape, generator=gen).to(dtype),
        "block_tables": tables,
        "seq_lens": torch.tensor(lengths, dtype=torch.int32),
        "query_start_loc": starts,
    }


def kernel_call(case: Case, x: dict, scale: float, out: torch.Tensor) -> Callable[[], None]:
    starts = x["query_start_loc"].tolist()
    if case.kind == "decode":
        rows = torch.arange(len(case.sequences), dtype=torch.long)
        return lambda: cpu_native.paged_decode_attention(
            out, x["query"], x["k_cache"], x["v_cache"], x["block_tables"], x["seq_lens"], rows, rows, scale
        )
    prompts = torch.tensor(
        [(starts[i], new, cached + new, i) for i, (cached, new) in enumerate(case.sequences)], dtype=torch.long
    )
    return lambda: cpu_native.paged_prefill_attention(
        out, x["query"], x["k_cache"], x["v_cache"], x["block_tables"], prompts, scale
    )


def flops(case: Case) -> float:
    """Multiply-adds x 2 of q.k and p.v over the keys each query sees (causal within a prompt)."""
    keys = sum(new * cached + new * (new + 1) / 2 for cached, new in case.sequences)
    return 4.0 * keys * case.num_heads * case.head_dim


def timed(fn: Callable[[], None], samples: list[float]) -> None:
    start = time.perf_counter()
    fn()
    samples.append((time.perf_counter() - start) * 1e6)


def measure(case: Case, dtype: torch.dtype, iterations: int) -> Row:
    x = paged_inputs(case, dtype)
    scale = case.head_dim**-0.5
    ours, theirs = torch.empty_like(x["query"]), torch.empty_like(x["query"])
    kernel = kernel_call(case, x, scale, ours)
    plan = reference.build_plan(x["block_tables"], x["seq_lens"], x["query_start_loc"], x["k_cache"])
    torch_path = lambda: reference.paged_attention(  # noqa: E731
        x["query"],
        x["k_cache"],
        x["v_cache"],
        x["block_tables"],
        x["seq_lens"],
        x["query_start_loc"],
        scale,
        out=theirs,
        plan=plan,
    )
    kernel(), torch_path()  # warm-up (and the outputs compared below)
    diff = (ours.float() - theirs.float()).abs().max().item()
    a: list[float] = []
    b: list[float] = []
    for _ in range(iterations):
        timed(kernel, a)
        timed(torch_path, b)
    kernel_us, torch_us = statistics.median(a), statistics.median(b)
    return Row(
        case.name,
        str(dtype).removeprefix("torch."),
        kernel_us,
        torch_us,
        torch_us / kernel_us,
        flops(case) / kernel_us / 1e3,
        diff,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--out", help="write the rows and the machine as JSON here")
    args = parser.parse_args(argv)
    if not cpu_native.load():
        raise SystemExit("the C++ CPU kernels did not build (see the warning above)")
    vectorized = cpu_native.paged_prefill_attention_is_vectorized()
    print(
        f"torch threads {torch.get_num_threads()}; prefill kernel vectorized: {vectorized} "
        "(the engine uses SDPA for prompts where it is not)"
    )
    rows = []
    with torch.inference_mode():
        for dtype in (getattr(torch, name) for name in args.dtypes.split(",")):
            for case in CASES:
                row = measure(case, dtype, args.iterations)
                rows.append(row)
                print(
                    f"{row.case:48s} {row.dtype:9s} kernel {row.kernel_us:9.0f} us  torch {row.torch_us:9.0f} us  "
                    f"{row.speedup:5.2f}x  {row.gflops_kernel:6.1f} GFLOP/s  max |diff| {row.max_abs_diff:.1e}"
                )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                {"benchmark": "cpu_attention", "machine": machine_info(), "rows": [asdict(r) for r in rows]},
                f,
                indent=1,
            )
        print(f"results: {args.out}")


if __name__ == "__main__":
    main()
