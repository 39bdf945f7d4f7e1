"""GPU check of the Triton kernels: correctness against `reference.py`, then decode/prefill/store timings.

  python bench/gpu_kernels.py --out bench/results/tmp/gpu_kernels.json  # H100/H200: checks + timings, < 90 s
  python bench/gpu_kernels.py --device cpu --small                      # CPU (TRITON_INTERPRET=1): checks only
Exits 1 when a check fails. Shapes are Llama-3-8B's (32 q heads, 8 kv heads, head_dim 128, block 16).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

# HBM peaks from NVIDIA datasheets, GB/s, matched in this order against the device name.
HBM_PEAK_GBS = (
    ("H100 PCIe", 2000),
    ("H100 NVL", 3900),
    ("H100", 3350),
    ("H200", 4800),
    ("A100-SXM4-40GB", 1555),
    ("A100 80GB PCIe", 1935),
    ("A100", 2039),
    ("A10G", 600),
    ("A10", 600),
    ("L40S", 864),
    ("L4", 300),
)
# (atol, rtol) against an fp32 oracle: the output's own rounding plus the rounding of P before the P @ V product.
TOLERANCE = {"float32": (1e-4, 1e-4), "float16": (3e-3, 3e-3), "bfloat16": (1.5e-2, 1.5e-2)}
L2_FLUSH_BYTES = 256 << 20  # timing rotates through cache copies at least this large, so reads come from HBM


@dataclass(slots=True)
class Shapes:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    decode_batches: tuple[int, ...]
    max_context: int


LLAMA3_8B = Shapes(32, 8, 128, 16, decode_batches=(1, 32, 128), max_context=4096)
SMALL = Shapes(4, 2, 32, 16, decode_batches=(1, 3), max_context=100)


@dataclass(slots=True)
class Report:
    device: str
    torch_version: str
    triton_version: str
    hbm_peak_gbs: float | None = None
    copy_gbs: float | None = None
    checks: list[dict] = field(default_factory=list)
    timings: list[dict] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c["passed"] for c in self.checks)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu runs Triton's interpreter")
    parser.add_argument("--small", action="store_true", help="tiny shapes (for the CPU interpreter)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--skip-timing", action="store_true", help="correctness checks only")
    return parser.parse_args(argv)


# Imports that need TRITON_INTERPRET settled first happen in main(); these are bound there.
torch = reference = paged_attention = store_kv = default_num_splits = None


def build_batch(shapes: Shapes, q_lens: list[int], seq_lens: list[int], dtype, device, seed: int) -> dict:
    """Random query and cache; every sequence owns shuffled blocks. Returns the kernel arguments by name."""
    gen = torch.Generator().manual_seed(seed)
    bs = shapes.block_size
    per_seq = [math.ceil(s / bs) for s in seq_lens]
    order = torch.randperm(sum(per_seq) + 1, generator=gen)
    tables = torch.zeros(len(seq_lens), max(per_seq + [1]), dtype=torch.int32)
    slots, taken = [], 0
    for i, (q_len, seq_len) in enumerate(zip(q_lens, seq_lens)):
        owned = order[taken : taken + per_seq[i]]
        taken += per_seq[i]
        tables[i, : len(owned)] = owned.int()
        if seq_len < q_len:  # a padding row: nothing to store
            slots.append(torch.full((q_len,), -1, dtype=torch.long))
            continue
        pos = torch.arange(seq_len - q_len, seq_len)
        slots.append(owned[pos // bs] * bs + pos % bs)
    cache_shape = (len(order), bs, shapes.num_kv_heads, shapes.head_dim)
    qsl = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
    qsl[1:] = torch.tensor(q_lens).cumsum(0)
    return dict(
        query=torch.randn(int(qsl[-1]), shapes.num_heads, shapes.head_dim, device=device, dtype=dtype),
        k_cache=torch.randn(cache_shape, device=device, dtype=dtype),
        v_cache=torch.randn(cache_shape, device=device, dtype=dtype),
        block_tables=tables.to(device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        query_start_loc=qsl.to(device),
        slot_mapping=torch.cat(slots).long().to(device),
        max_query_len=max(q_lens),  # a host int, as the model runner passes it: no sync inside a capture
    )


def attention_args(b: dict) -> tuple:
    return (b["query"], b["k_cache"], b["v_cache"], b["block_tables"], b["seq_lens"], b["query_start_loc"])


def run_kernel(b: dict, out=None, num_splits=None):
    scale = b["query"].shape[-1] ** -0.5
    return paged_attention(*attention_args(b), scale, b["max_query_len"], out, num_splits=num_splits)


def oracle(b: dict, rows: slice = slice(None)):
    q, k, v, tables, lens, qsl = attention_args(b)
    out = reference.paged_attention(q.float(), k.float(), v.float(), tables, lens, qsl, q.shape[-1] ** -0.5)
    return out[rows]


def record(report: Report, name: str, dtype, actual, expected) -> None:
    dtype_name = str(dtype).removeprefix("torch.")
    finite = bool(torch.isfinite(actual).all())
    atol, rtol = TOLERANCE[dtype_name]
    diff = (actual.float() - expected.float()).abs()
    err = float(diff.max()) if diff.numel() else 0.0
    passed = finite and bool((diff <= atol + rtol * expected.float().abs()).all())
    report.checks.append(
        dict(name=name, dtype=dtype_name, max_abs_err=err, atol=atol, rtol=rtol, finite=finite, passed=passed)
    )
    print(f"{'PASS' if passed else 'FAIL'}  {name:<44} {dtype_name:<9} max_abs_err={err:.2e}")


def check_store(report: Report, shapes: Shapes, dtype, device, num_tokens: int) -> None:
    b = build_batch(shapes, [num_tokens], [num_tokens], dtype, device, seed=1)
    slots = b["slot_mapping"].clone()
    slots[::7] = -1  # padding rows: skipped
    key = torch.randn(num_tokens, shapes.num_kv_heads, shapes.head_dim, device=device, dtype=dtype)
    value = torch.randn_like(key)
    k_ref, v_ref = b["k_cache"].clone(), b["v_cache"].clone()
    reference.store_kv(key, value, k_ref, v_ref, slots)
    store_kv(key, value, b["k_cache"], b["v_cache"], slots)
    diff = torch.stack([(b["k_cache"] - k_ref).abs().max(), (b["v_cache"] - v_ref).abs().max()])
    record(report, f"store_kv tokens={num_tokens}", dtype, diff, torch.zeros_like(diff))


def check_attention(report: Report, name: str, b: dict, dtype, num_splits=None) -> None:
    out = torch.full_like(b["query"], float("nan"))  # every real row must be overwritten
    run_kernel(b, out, num_splits)
    record(report, name, dtype, out, oracle(b))


def random_lens(gen, n: int, low: int, high: int) -> list[int]:
    return torch.randint(low, high + 1, (n,), generator=gen).tolist()


def run_checks(report: Report, shapes: Shapes, device, small: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    ctx, low = shapes.max_context, 1 if small else 128
    dtypes = (torch.float16, torch.bfloat16)
    for dtype in dtypes:
        check_store(report, shapes, dtype, device, 24 if small else 4096)
        for batch in shapes.decode_batches:
            lens = random_lens(gen, batch, low, ctx)
            lens[0] = ctx  # the longest context always appears
            b = build_batch(shapes, [1] * batch, lens, dtype, device, seed=batch)
            check_attention(report, f"decode b={batch} auto-splits", b, dtype)
        b = build_batch(shapes, [1], [ctx], dtype, device, seed=7)
        check_attention(report, "decode b=1 no split", b, dtype, num_splits=1)
        q_lens = random_lens(gen, 3, 2, ctx // 4)
        b = build_batch(shapes, q_lens, q_lens, dtype, device, seed=8)
        check_attention(report, "prefill (no cached prefix)", b, dtype)
        prefix = random_lens(gen, 3, 1, ctx // 2)
        b = build_batch(shapes, q_lens, [p + q for p, q in zip(prefix, q_lens)], dtype, device, seed=9)
        check_attention(report, "extend (cached prefix + new)", b, dtype)
        decode_lens = random_lens(gen, 6, 1, ctx)
        b = build_batch(shapes, [1] * 6 + q_lens, decode_lens + q_lens, dtype, device, seed=10)
        check_attention(report, "mixed decode + prefill rows", b, dtype)
    check_padding_rows(report, shapes, device)
    if device.type == "cuda":
        check_graph_replay(report, shapes, device)


def check_padding_rows(report: Report, shapes: Shapes, device) -> None:
    """A CUDA-graph decode batch: real rows, then padding rows with seq_len 0 / 1 (block 0): finite output."""
    dtype = torch.bfloat16
    b = build_batch(shapes, [1] * 6, [shapes.max_context, 1, 17, 5, 0, 1], dtype, device, seed=11)
    b["block_tables"][4:] = 0
    for num_splits in (1, 4):
        out = torch.full_like(b["query"], float("nan"))
        run_kernel(b, out, num_splits)
        record(report, f"padding rows splits={num_splits}", dtype, out, torch.cat([oracle(b, slice(0, 4)), out[4:]]))


def check_graph_replay(report: Report, shapes: Shapes, device) -> None:
    """Capture decode once, then change lengths and queries in place: the replay must follow the new values."""
    dtype, batch, ctx = torch.bfloat16, 32, shapes.max_context
    b = build_batch(shapes, [1] * batch, [ctx] * batch, dtype, device, seed=12)
    out = torch.empty_like(b["query"])
    run_kernel(b, out)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run_kernel(b, out)
    gen = torch.Generator().manual_seed(13)
    b["seq_lens"].copy_(torch.tensor(random_lens(gen, batch, 1, ctx), dtype=torch.int32))
    b["query"].copy_(torch.randn_like(b["query"]))
    graph.replay()
    record(report, "CUDA graph replay with new lengths", dtype, out, oracle(b))


def cuda_time_us(fn, iters: int, reps: int = 3) -> float:
    """GPU time per call from a CUDA graph of `iters` calls (launch overhead excluded), best of `reps`."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn(0)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(iters):
            fn(i)
    graph.replay()
    best = float("inf")
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) * 1000 / iters)
    return best


def eager_time_us(fn, iters: int = 20) -> float:
    """Wall time per call with launches from Python (what a step without graphs pays)."""
    fn(0)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(iters):
        fn(i)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e6 / iters


def time_decode(report: Report, shapes: Shapes, device) -> None:
    dtype, elem = torch.bfloat16, 2
    for batch in shapes.decode_batches:
        for ctx in (1024, shapes.max_context):
            b = build_batch(shapes, [1] * batch, [ctx] * batch, dtype, device, seed=batch + ctx)
            kv_bytes = 2 * batch * ctx * shapes.num_kv_heads * shapes.head_dim * elem
            # Distinct cache copies per call so small working sets cannot sit in L2 between calls.
            copies = max(1, min(64, math.ceil(L2_FLUSH_BYTES / kv_bytes)))
            caches = [(b["k_cache"].clone(), b["v_cache"].clone()) for _ in range(copies)]
            out = torch.empty_like(b["query"])
            scale = shapes.head_dim**-0.5

            def call(i: int, b=b, caches=caches, out=out, scale=scale) -> None:
                k, v = caches[i % len(caches)]
                paged_attention(b["query"], k, v, b["block_tables"], b["seq_lens"], b["query_start_loc"], scale, 1, out)

            graph_us = cuda_time_us(call, iters=max(16, copies))
            gbs = kv_bytes / graph_us / 1e3
            splits = default_num_splits(batch, shapes.num_kv_heads, device)
            row = dict(
                kernel="decode",
                dtype="bfloat16",
                batch=batch,
                context=ctx,
                splits=splits,
                graph_us=round(graph_us, 2),
                eager_us=round(eager_time_us(call), 2),
                kv_bytes=kv_bytes,
                kv_gbs=round(gbs, 1),
                frac_of_hbm_peak=_frac(gbs, report.hbm_peak_gbs),
                frac_of_copy=_frac(gbs, report.copy_gbs),
            )
            report.timings.append(row)
            print(
                f"decode b={batch:<4} ctx={ctx:<5} splits={splits:<3} {graph_us:8.1f} us (graph) "
                f"{row['eager_us']:8.1f} us (eager)  {gbs:7.0f} GB/s  {row['frac_of_hbm_peak']} of peak"
            )


def time_prefill_and_store(report: Report, shapes: Shapes, device) -> None:
    dtype = torch.bfloat16
    cases = (("prefill 1x4096", [4096], [4096]), ("extend 4x512 after 3584", [512] * 4, [4096] * 4))
    for name, q_lens, seq_lens in cases:
        b = build_batch(shapes, q_lens, seq_lens, dtype, device, seed=3)
        out = torch.empty_like(b["query"])
        us = cuda_time_us(lambda i, b=b, out=out: run_kernel(b, out), iters=5)
        pairs = sum(q * (s - q) + q * (q + 1) / 2 for q, s in zip(q_lens, seq_lens))  # causal (query, key) pairs
        tflops = 4 * pairs * shapes.num_heads * shapes.head_dim / us / 1e6
        report.timings.append(dict(kernel=name, dtype="bfloat16", graph_us=round(us, 1), tflops=round(tflops, 1)))
        print(f"{name:<24} {us:9.1f} us  {tflops:6.1f} TFLOP/s")
    for num_tokens in (128, 4096):
        b = build_batch(shapes, [num_tokens], [num_tokens], dtype, device, seed=4)
        key = torch.randn(num_tokens, shapes.num_kv_heads, shapes.head_dim, device=device, dtype=dtype)
        us = cuda_time_us(
            lambda i, b=b, key=key: store_kv(key, key, b["k_cache"], b["v_cache"], b["slot_mapping"]), iters=10
        )
        report.timings.append(dict(kernel="store_kv", dtype="bfloat16", tokens=num_tokens, graph_us=round(us, 2)))
        print(f"store_kv tokens={num_tokens:<5} {us:9.2f} us")


# (N, K) of Llama-3-8B's one-row linears: qkv, o, gate_up, down, LM head; small ones for the interpreter.
GEMV_SHAPES = {
    "llama3-8b": ((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (128256, 4096)),
    "small": ((48, 64), (37, 300)),
}


def check_and_time_gemv(report: Report, device, small: bool, timing: bool) -> None:
    """Every Triton GEMV config against an fp64 product (one check per shape), then cuBLAS vs the configs."""
    from model_handler.kernels import triton_gemv
    from model_handler.layers import gpu_linear

    gen = torch.Generator().manual_seed(7)
    for n, k in GEMV_SHAPES["small" if small else "llama3-8b"]:
        x = torch.randn(1, k, generator=gen).to(device, torch.bfloat16)
        weight = (torch.randn(n, k, generator=gen) * 0.02).to(device, torch.bfloat16)
        expected = (x.double() @ weight.double().T).float()  # [1, N]
        worst, worst_err = None, -1.0
        for config in triton_gemv.CONFIGS:
            y = triton_gemv.gemv(x, weight, None, config).float()
            err = float(((y - expected).abs() / (1.5e-2 + 1.5e-2 * expected.abs())).max())  # < 1 passes
            if err > worst_err:
                worst, worst_err = y, err
        record(report, f"gemv {n}x{k} (worst of {len(triton_gemv.CONFIGS)} configs)", torch.bfloat16, worst, expected)
        if timing:
            choice = gpu_linear.measure(x, weight, None)
            t = choice.timings_ms
            best = min((v, c) for c, v in t.items() if c != gpu_linear.CUBLAS)
            weight_bytes = weight.numel() * 2

            def gbs(ms: float, weight_bytes: int = weight_bytes) -> float:
                return round(weight_bytes / ms / 1e6, 1)

            row = dict(
                kernel="one-row linear",
                n=n,
                k=k,
                cublas_us=round(1e3 * t[gpu_linear.CUBLAS], 1),
                cublas_gbs=gbs(t[gpu_linear.CUBLAS]),
                triton_us=round(1e3 * best[0], 1),
                triton_gbs=gbs(best[0]),
                triton_config=best[1],
                chosen=str(choice.winner),
                all_ms=t,
            )
            report.timings.append(row)
            print(
                f"gemv {n:>6}x{k:<5}  cuBLAS {row['cublas_us']:8.1f} us {row['cublas_gbs']:7.1f} GB/s   "
                f"triton {row['triton_us']:8.1f} us {row['triton_gbs']:7.1f} GB/s  ({best[1]})  -> {row['chosen']}"
            )
        del x, weight


def _frac(gbs: float, peak: float | None) -> float | None:
    return round(gbs / peak, 3) if peak else None


def copy_bandwidth_gbs(device) -> float:
    src = torch.empty(512 << 20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    us = cuda_time_us(lambda i: dst.copy_(src), iters=5)
    return round(2 * src.numel() / us / 1e3, 1)  # read + write


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported
    if not __package__:  # run as `python bench/gpu_kernels.py`: make the repository importable
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    global torch, reference, paged_attention, store_kv, default_num_splits
    import torch
    import triton

    from model_handler.kernels import reference
    from model_handler.kernels.triton_attention import default_num_splits, paged_attention
    from model_handler.kernels.triton_kv_store import store_kv

    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --device cpu --small", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 oracle must be exact
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)"
    report = Report(name, torch.__version__, triton.__version__)
    report.hbm_peak_gbs = next((gbs for key, gbs in HBM_PEAK_GBS if key in name), None)
    shapes = SMALL if args.small else LLAMA3_8B
    print(f"device: {name}  torch {torch.__version__}  triton {triton.__version__}  shapes: {asdict(shapes)}")
    started = time.perf_counter()
    torch.manual_seed(0)
    run_checks(report, shapes, device, args.small)
    check_and_time_gemv(report, device, args.small, timing=device.type == "cuda" and not args.skip_timing)
    if device.type == "cuda" and not args.skip_timing:
        report.copy_gbs = copy_bandwidth_gbs(device)
        print(f"HBM: datasheet {report.hbm_peak_gbs} GB/s, measured copy {report.copy_gbs} GB/s")
        time_decode(report, shapes, device)
        time_prefill_and_store(report, shapes, device)
    failed = [c["name"] for c in report.checks if not c["passed"]]
    print(f"{'FAIL: ' + ', '.join(failed) if failed else 'ALL PASS'}  ({time.perf_counter() - started:.1f} s)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(dict(asdict(report), passed=report.passed), indent=2))
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
