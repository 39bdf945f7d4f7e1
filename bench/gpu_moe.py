"""The fused Triton MoE on a GPU at Mixtral-8x7B's shapes, against the torch experts loop: one layer's experts on
its own router's choices (per batch size: agreement, then each path's time), and the whole model's logits with
every layer on one path, then on the other. The engine's decode throughput on the same folder is measured by
`bench.gpu_engine ours` (bench/gpu_check.sh runs both).

  python -m bench.gpu_moe MODEL_DIR --out gpu_moe.json [--preset mixtral-4l|mixtral-smoke] [--device cuda|cpu]
                                    [--dtype bfloat16] [--batch-sizes 1,32,128,1024] [--skip-timing]
With --preset the random folder is first built into MODEL_DIR by `bench.gpu_model` (reused when it is there).
On CPU the Triton kernels run under the interpreter (correctness only). Exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

# (relative max error of the fused path against the torch path) per dtype: bf16 rounds the intermediate
# activations and each expert's output once on both paths, but at different points.
TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2, "float16": 5e-3}
PROMPT_LENS = (17, 64, 100)  # the whole-model check's prefill: three sequences in one flat batch
BLOCK_SIZE = 16


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--preset", help="build the folder first with bench.gpu_model's preset of this name")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--dtype", choices=sorted(TOLERANCE), default="bfloat16")
    parser.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 32, 128, 1024])
    parser.add_argument("--skip-timing", action="store_true")
    return parser.parse_args(argv)


def relative_error(got, want) -> float:
    return float((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-30))


def layer_checks(block, batch_sizes: list[int], tolerance: float, timing: bool, record: dict) -> None:
    """The first MoE layer's experts on hidden-state-like inputs routed by its own router, both paths."""
    import torch

    from model_handler.kernels import moe_reference, triton_moe

    experts = block.experts
    w13, w2 = experts.w13_weight, experts.w2_weight
    gen = torch.Generator(device=w13.device).manual_seed(0)
    for num_tokens in batch_sizes:
        x = torch.randn(num_tokens, w13.shape[2], generator=gen, device=w13.device).to(w13.dtype)  # [T, hidden]
        weights, ids = moe_reference.route(block.gate(x), block.top_k, block.renormalize)  # [T, k]
        fused = triton_moe.fused_experts(x, w13, w2, weights, ids)
        loop = moe_reference.experts(x, w13, w2, weights, ids)
        error = relative_error(fused, loop)
        loads = torch.bincount(ids.flatten(), minlength=experts.num_experts).tolist()
        record["checks"].append(
            {
                "name": f"layer experts, {num_tokens} tokens",
                "passed": error < tolerance,
                "relative_error": float(f"{error:.3g}"),
                "tokens_per_expert": loads,
            }
        )
        if timing:
            record["layer_timings"].append(time_layer(x, w13, w2, weights, ids, experts.num_experts))


def time_layer(x, w13, w2, weights, ids, num_experts: int) -> dict[str, Any]:
    """Median ms of each path (L2 flushed between runs) and the fused path's rate over the weights it reads."""
    import torch
    from triton.testing import do_bench

    from model_handler.kernels import moe_reference, triton_moe

    fused_ms = do_bench(lambda: triton_moe.fused_experts(x, w13, w2, weights, ids), return_mode="median")
    loop_ms = do_bench(lambda: moe_reference.experts(x, w13, w2, weights, ids), return_mode="median")
    used = int(torch.unique(ids).numel())  # experts a batch touches: their weights are read once each
    expert_bytes = (w13[0].numel() + w2[0].numel()) * w13.element_size()
    return {
        "tokens": x.shape[0],
        "experts_used": f"{used}/{num_experts}",
        "fused_ms": round(fused_ms, 4),
        "torch_loop_ms": round(loop_ms, 4),
        "speedup": round(loop_ms / fused_ms, 2),
        "fused_weight_gbs": round(used * expert_bytes / (fused_ms * 1e6), 1),
    }


def model_logits(model, use_triton: bool, device, dtype):
    """Logits of every prompt token of the PROMPT_LENS prefill, with every MoE layer on one path."""
    import torch

    from model_handler import kv_cache
    from model_handler.layers.attention_metadata import AttentionMetadata
    from model_handler.layers.moe import SparseMoeBlock

    for layer in model.model.layers:
        if isinstance(layer.mlp, SparseMoeBlock):
            layer.mlp.experts.use_triton = use_triton
    config = model.config
    blocks = [-(-n // BLOCK_SIZE) for n in PROMPT_LENS]
    _, caches = kv_cache.allocate(
        config.num_layers, sum(blocks), BLOCK_SIZE, model.num_kv_heads_per_rank, config.head_dim, dtype, device
    )
    tables = torch.zeros(len(PROMPT_LENS), max(blocks), dtype=torch.int32)
    starts = torch.tensor([0, *blocks]).cumsum(0)
    slots = []
    for i, n in enumerate(PROMPT_LENS):
        tables[i, : blocks[i]] = torch.arange(int(starts[i]), int(starts[i + 1]))
        slots.append(int(starts[i]) * BLOCK_SIZE + torch.arange(n))
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(1, config.vocab_size, (sum(PROMPT_LENS),), generator=gen)
    metadata = AttentionMetadata(
        slot_mapping=torch.cat(slots).to(device),
        query_start_loc=torch.tensor([0, *PROMPT_LENS]).cumsum(0).to(device, torch.int32),
        seq_lens=torch.tensor(PROMPT_LENS, dtype=torch.int32, device=device),
        block_tables=tables.to(device),
        max_query_len=max(PROMPT_LENS),
        max_seq_len=max(PROMPT_LENS),
    )
    positions = torch.cat([torch.arange(n) for n in PROMPT_LENS]).to(device)
    with torch.inference_mode():
        hidden = model(input_ids.to(device), positions, caches, metadata)
        return model.compute_logits(hidden)  # [T, vocab] fp32


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import triton

    from model_handler.kernels import select_backend
    from model_handler.layers.moe import SparseMoeBlock
    from model_handler.model_loader import load_model

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    build = None
    if args.preset:
        from bench import gpu_model

        build = gpu_model.build(args.model_dir, args.preset, args.device)
        how = "reused" if build["reused"] else f"built in {build['build_s']} s"
        print(f"model folder {args.model_dir}: {build['weight_bytes'] / 1e9:.2f} GB, {how}", flush=True)
    record: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (Triton interpreter)",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "model_dir": str(args.model_dir),
        "dtype": args.dtype,
        "model": build,
        "checks": [],
        "layer_timings": [],
    }
    model = load_model(args.model_dir, dtype=dtype, device=device, attention_backend=select_backend(device, "triton"))
    blocks = [layer.mlp for layer in model.model.layers if isinstance(layer.mlp, SparseMoeBlock)]
    if not blocks:
        raise ValueError(f"{args.model_dir} has no MoE layer (architecture {model.config.architecture})")
    record["num_layers"] = model.config.num_layers
    record["experts"] = {"num_experts": blocks[0].experts.num_experts, "top_k": blocks[0].top_k}
    tolerance = TOLERANCE[args.dtype]
    layer_checks(blocks[0], args.batch_sizes, tolerance, not args.skip_timing and device.type == "cuda", record)
    fused, loop = (model_logits(model, path, device, dtype) for path in (True, False))
    error = relative_error(fused, loop)
    agree = float((fused.argmax(-1) == loop.argmax(-1)).float().mean())
    record["checks"].append(
        {
            "name": f"model logits, prefill of {sum(PROMPT_LENS)} tokens, fused vs torch experts in every layer",
            # bf16 may send a near-tied token to another expert on one path: the argmax must still agree.
            "passed": error < 5 * tolerance and agree >= 0.95,
            "relative_error": float(f"{error:.3g}"),
            "argmax_agreement": round(agree, 4),
        }
    )
    record["passed"] = all(check["passed"] for check in record["checks"])
    return record


# ---- the gpu_check report's MoE rows (bench.gpu_engine report calls these) --------------------------------


def report_checks(stages: dict[str, str], data: dict) -> list[dict]:
    """The fused MoE kernel against the torch path (bench/gpu_moe.py), and the engine's lengths on the MoE model."""
    checks = []
    moe = data.get("moe")
    if stages.get("moe", "skip") != "skip":
        failed = [c["name"] for c in moe["checks"] if not c["passed"]] if moe else []
        ok = stages["moe"] == "0" and bool(moe and moe.get("passed") and moe["checks"])
        detail = (
            f"{len(moe['checks']) - len(failed)}/{len(moe['checks'])} checks pass, worst relative error "
            f"{max(c['relative_error'] for c in moe['checks']):.3g}"
            if moe and moe["checks"]
            else f"no results (rc {stages['moe']})"
        )
        checks.append(
            {
                "name": "MoE: fused Triton experts vs the torch path (bench/gpu_moe.py)",
                "ok": ok,
                "detail": detail + (f"; failed: {', '.join(failed[:3])}" if failed else ""),
            }
        )
    ours_moe = data.get("ours_moe")
    if ours_moe is not None:
        bad = [r["batch"] for r in ours_moe["runs"] if not r["exact_lengths"]]
        checks.append(
            {
                "name": "ours (MoE): every request got exactly --output-tokens",
                "ok": not bad,
                "detail": f"wrong lengths at batch {bad}" if bad else f"{len(ours_moe['runs'])} runs",
            }
        )
    return checks


def report_lines(data: dict) -> list[str]:
    """Information lines: the MoE engine's decode rates, batch-1 bandwidth over the weights a token reads,
    and the fused experts' time per layer against the torch loop."""
    moe, ours_moe = data.get("moe") or {}, data.get("ours_moe") or {}
    lines = []
    model = moe.get("model") or {}
    if ours_moe.get("runs"):
        rows = [
            f"b{r['batch']} {r['output_tok_s']} tok/s ({r['decode_ms_step_median']} ms/step, "
            f"graphs {r.get('graph_replays')}/{r.get('num_decode_steps')})"
            for r in ours_moe["runs"]
        ]
        lines.append(f"ours (MoE, {moe.get('num_layers', '?')} layers): " + ", ".join(rows))
        b1 = next((r for r in ours_moe["runs"] if r["batch"] == 1), None)
        experts = moe.get("experts") or {}
        if b1 and b1["decode_ms_step_median"] and model.get("expert_bytes") and experts:
            # One token reads top_k of the experts; the embedding table only one row.
            skipped = model["expert_bytes"] * (1 - experts["top_k"] / experts["num_experts"])
            active = model["weight_bytes"] - skipped - model.get("embedding_bytes", 0)
            gbs = active / (b1["decode_ms_step_median"] / 1e3) / 1e9
            datasheet = ours_moe.get("hbm_datasheet_gbs")
            share = f" = {gbs / datasheet:.1%} of the {datasheet} GB/s datasheet" if datasheet else ""
            lines.append(f"ours (MoE) batch 1: {active / 1e9:.2f} GB of weights read per step -> {gbs:.0f} GB/s{share}")
    for t in moe.get("layer_timings", []):
        lines.append(
            f"MoE layer experts, {t['tokens']} tokens ({t['experts_used']} experts): fused {t['fused_ms']} ms, "
            f"torch loop {t['torch_loop_ms']} ms ({t['speedup']}x), fused reads {t['fused_weight_gbs']} GB/s"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported
    else:
        import torch

        if not torch.cuda.is_available():
            print("no CUDA device: pass --device cpu", file=sys.stderr)
            return 2
    record = run(args)
    for check in record["checks"]:
        print(f"{'PASS' if check['passed'] else 'FAIL'} {check['name']}: relative error {check['relative_error']}")
    for t in record["layer_timings"]:
        print(
            f"layer experts {t['tokens']:>5} tokens ({t['experts_used']} experts): fused {t['fused_ms']} ms, "
            f"torch loop {t['torch_loop_ms']} ms ({t['speedup']}x), fused reads {t['fused_weight_gbs']} GB/s"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    return 0 if record["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
