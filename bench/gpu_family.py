"""A model family's serving path (Triton kernels on CUDA, the C++ kernels on CPU) against its torch path on the same
weights, then the GPU check's verdict for that family (`bash bench/gpu_check.sh --case gemma2-9b`).

  python -m bench.gpu_family check MODEL_DIR --out check.json [--device cuda] [--dtype bfloat16] [--long-prompt N]
  python -m bench.gpu_family report --results DIR --case NAME [--stage NAME=RC ...]

`check` loads the folder on the device twice, one after the other: with the engine's attention backend and fused
kernels, then with the torch reference (SDPA over gathered blocks, plain torch ops); it runs the same paged steps
through both: one prompt longer than the model's sliding window (so the window decides the result), two short ones,
then decode steps, and compares the sampled rows' logits (relative L2 error and top-1 agreement). `report` adds the
engine's decode throughput (from `bench.gpu_engine ours` on the same folder) and writes gpu_check_<case>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 1e-2}
"""Largest relative L2 error of a step's logits against the torch path: rounding only (fp32: kernel sum order)."""
MIN_TOP1 = 0.9
"""Top-1 agreement below this fails even within the tolerance (near-ties of a random model may flip a few)."""
SHORT_PROMPTS = (37, 5)
DECODE_STEPS = 8
BLOCK_SIZE = 16


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check")
    check.add_argument("model_dir", type=Path)
    check.add_argument("--out", type=Path, required=True)
    check.add_argument("--device", default="cuda")
    check.add_argument("--dtype", choices=sorted(TOLERANCE), default="bfloat16")
    check.add_argument("--long-prompt", type=int, help="default: the model's sliding window + 300 tokens")
    report = sub.add_parser("report")
    report.add_argument("--results", type=Path, required=True)
    report.add_argument("--case", required=True)
    report.add_argument("--stage", action="append", default=[], help="NAME=RC of a stage (RC 'skip': not run)")
    return parser.parse_args(argv)


class PagedSteps:
    """Flat paged batches for a few sequences: contiguous block ranges, positions, slots, the sampled rows."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.lengths: list[int] = []
        self.tables: list[list[int]] = []
        self.next_block = 0

    def step(self, new_tokens: list[list[int]], device) -> tuple[Any, Any, Any, Any]:
        """(input_ids, positions, metadata, output_rows) appending new_tokens[i] to sequence i."""
        import torch

        from model_handler.layers.attention_metadata import AttentionMetadata

        ids, positions, slots, q_lens = [], [], [], []
        for i, tokens in enumerate(new_tokens):
            if i == len(self.lengths):
                self.lengths.append(0)
                self.tables.append([])
            start = self.lengths[i]
            self.lengths[i] += len(tokens)
            while len(self.tables[i]) * self.block_size < self.lengths[i]:
                self.tables[i].append(self.next_block)
                self.next_block += 1
            for pos in range(start, self.lengths[i]):
                slots.append(self.tables[i][pos // self.block_size] * self.block_size + pos % self.block_size)
                positions.append(pos)
            ids += tokens
            q_lens.append(len(tokens))
        width = max(len(table) for table in self.tables)
        tables = torch.tensor([table + [0] * (width - len(table)) for table in self.tables], dtype=torch.int32)
        starts = torch.tensor([0, *q_lens], dtype=torch.int32).cumsum(0).to(torch.int32)
        metadata = AttentionMetadata(
            slot_mapping=torch.tensor(slots, device=device),
            query_start_loc=starts.to(device),
            seq_lens=torch.tensor(self.lengths, dtype=torch.int32, device=device),
            block_tables=tables.to(device),
            max_query_len=max(q_lens),
            max_seq_len=max(self.lengths),
        )
        output_rows = (starts[1:] - 1).long().to(device)  # each sequence's last new token
        return torch.tensor(ids, device=device), torch.tensor(positions, device=device), metadata, output_rows


def run_check(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from model_handler.config import DTYPES
    from model_handler.kernels import TorchReferenceBackend, select_backend
    from model_handler.kv_cache import allocate
    from model_handler.model_config import ModelConfig
    from model_handler.model_loader import load_model

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    config = ModelConfig.from_model_dir(args.model_dir)
    windows = [w for w in config.sliding_windows if w is not None]
    long_prompt = args.long_prompt or (max(windows) if windows else 1024) + 300
    lengths = [long_prompt, *SHORT_PROMPTS]
    num_blocks = sum(-(-(n + DECODE_STEPS) // BLOCK_SIZE) for n in lengths)
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, config.vocab_size, (n,), generator=generator).tolist() for n in lengths]
    decodes = torch.randint(3, config.vocab_size, (DECODE_STEPS, len(lengths)), generator=generator).tolist()
    record: dict[str, Any] = {"model_dir": str(args.model_dir), "architecture": config.architecture}
    record |= {"dtype": args.dtype, "device": str(device), "prompt_lengths": lengths}
    record["sliding_windows"] = sorted(set(windows))
    logits: dict[str, list[torch.Tensor]] = {}
    for name, backend in (("serving", select_backend(device)), ("torch", TorchReferenceBackend())):
        began = time.perf_counter()
        model = load_model(args.model_dir, dtype=dtype, device=device, attention_backend=backend)
        record[f"{name}_backend"] = backend.name
        record[f"{name}_load_s"] = round(time.perf_counter() - began, 2)
        _, caches = allocate(
            config.num_layers, num_blocks, BLOCK_SIZE, model.num_kv_heads_per_rank, config.head_dim, dtype, device
        )
        steps = PagedSteps(BLOCK_SIZE)
        logits[name] = []
        with torch.inference_mode():
            for new_tokens in [prompts, *([[t] for t in row] for row in decodes)]:
                input_ids, positions, metadata, rows = steps.step(new_tokens, device)
                hidden = model(input_ids, positions, caches, metadata, rows)
                logits[name].append(model.compute_logits(hidden).float().cpu())  # [num_seqs, vocab]
        del model, caches
        if device.type == "cuda":
            torch.cuda.empty_cache()
    errors, agreements = [], []
    for ours, ref in zip(logits["serving"], logits["torch"]):
        errors.append(((ours - ref).norm() / ref.norm().clamp_min(1e-12)).item())
        agreements.append((ours.argmax(-1) == ref.argmax(-1)).float().mean().item())
    record["steps"] = [{"rel_l2": round(e, 6), "top1": round(a, 4)} for e, a in zip(errors, agreements)]
    record["max_rel_l2"] = round(max(errors), 6)
    record["top1"] = round(sum(agreements) / len(agreements), 4)
    record["tolerance"] = TOLERANCE[args.dtype]
    record["passed"] = record["max_rel_l2"] <= record["tolerance"] and record["top1"] >= MIN_TOP1
    print(
        f"{config.architecture} {args.dtype}: {record['serving_backend']} vs torch over {len(errors)} steps "
        f"(prompts {lengths}, windows {sorted(set(windows))}): max rel L2 {record['max_rel_l2']:.2e} "
        f"(<= {record['tolerance']}), top-1 {record['top1']:.3f} -> {'PASS' if record['passed'] else 'FAIL'}",
        flush=True,
    )
    return record


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def report_main(args: argparse.Namespace) -> int:
    """Exit 0: correct; 1: the serving path disagrees with the torch path; 2: a stage failed or did not run."""
    stages = dict(item.split("=", 1) for item in args.stage)
    check = _load(args.results / f"gpu_family_{args.case}.json")
    engine = _load(args.results / f"gpu_engine_{args.case}.json")
    model = _load(args.results / f"gpu_model_{args.case}.json")
    runs = []
    for run in (engine or {}).get("runs", []):
        row = {key: run.get(key) for key in ("batch", "output_tok_s", "decode_ms_step_median", "ttft_ms_median")}
        if model and engine.get("hbm_datasheet_gbs") and run.get("decode_ms_step_median") and run["batch"] == 1:
            gbs = model["weight_bytes"] / (run["decode_ms_step_median"] * 1e6)
            row["weights_gbs"] = round(gbs, 1)
            row["frac_hbm_datasheet"] = round(gbs / engine["hbm_datasheet_gbs"], 3)
        runs.append(row)
    summary = {"case": args.case, "stages": stages, "check": check, "decode": runs}
    (args.results / f"gpu_check_{args.case}.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"== {args.case}: stages {stages}")
    if check is not None:
        verdict = "PASS" if check["passed"] else "FAIL"
        print(
            f"{verdict} {check['serving_backend']} path vs torch path: max rel L2 {check['max_rel_l2']:.2e}, "
            f"top-1 {check['top1']:.3f} (prompts {check['prompt_lengths']}, windows {check['sliding_windows']})"
        )
    for row in runs:
        roofline = (
            f", {row['weights_gbs']} GB/s of weights ({row['frac_hbm_datasheet']:.0%} of HBM)"
            if "weights_gbs" in row
            else ""
        )
        print(
            f"decode b={row['batch']}: {row['output_tok_s']} tok/s, {row['decode_ms_step_median']} ms/step, "
            f"TTFT p50 {row['ttft_ms_median']} ms{roofline}"
        )
    if any(rc not in ("0", "skip") for rc in stages.values()) or check is None or not runs:
        return 2
    return 0 if check["passed"] else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "report":
        return report_main(args)
    record = run_check(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    return 0 if record["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
