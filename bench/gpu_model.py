"""Builds a model folder of a real architecture's shape with random bf16 weights (no download, no tokenizer).

  python -m bench.gpu_model OUT_DIR [--preset llama3-8b|smoke|mixtral-4l|mixtral-smoke|gemma2-9b|gemma2-smoke]
                                    [--device cuda|cpu]
                                    [--json build.json]
Weights are drawn on the device and streamed straight into sharded safetensors files (one writer thread per
shard, chunks of at most 64M elements), so a 16 GB folder never sits whole in host or device memory.
A folder already built with the same preset and seed is reused. The benchmarks feed token ids, so there is
no tokenizer; config.json is Llama-3.1-8B's own (llama3 rope scaling in its 4.x spelling), Mixtral-8x7B's
with 4 of its 32 layers (12.2 GB: fits one H100 beside a KV cache; the whole model is 93 GB), or Gemma-2-9B's.
"""

from __future__ import annotations

import argparse
import json
import math
import struct
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

FORMAT_VERSION = 1
BUILD_FILE = "build.json"
INDEX_FILE = "model.safetensors.index.json"
WEIGHT_STD = 0.02
CHUNK_ELEMENTS = 64 << 20  # 128 MB of bf16 per device draw: keeps each writer's device footprint small

# Meta-Llama-3.1-8B's config.json, verbatim apart from the version stamp.
LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009],
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": 128256,
}
# The same architecture and config fields at a size the CPU smoke run builds and runs in seconds.
SMOKE = {
    **LLAMA3_8B,
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 4096,
    "bos_token_id": 1,
    "eos_token_id": [2, 3],
}
# Mixtral-8x7B-v0.1's config.json with 4 of its 32 layers: every layer has its full shape (8 experts of
# 14336, top-2), so a decode step per layer moves what the real model's does.
MIXTRAL_4L = {
    "architectures": ["MixtralForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 32768,
    "model_type": "mixtral",
    "num_attention_heads": 32,
    "num_experts_per_tok": 2,
    "num_hidden_layers": 4,
    "num_key_value_heads": 8,
    "num_local_experts": 8,
    "output_router_logits": False,
    "rms_norm_eps": 1e-05,
    "rope_theta": 1000000.0,
    "router_aux_loss_coef": 0.02,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": 32000,
}
MIXTRAL_SMOKE = {
    **MIXTRAL_4L,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_local_experts": 4,
    "vocab_size": 4096,
    "max_position_embeddings": 4096,
}
# google/gemma-2-9b's config.json, verbatim apart from the dtype: sliding windows of 4096 on alternate layers,
# attention logits soft-capped at 50 and final logits at 30, GeGLU, (1 + w) norms, tied embeddings.
GEMMA2_9B = {
    "architectures": ["Gemma2ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "attn_logit_softcapping": 50.0,
    "bos_token_id": 2,
    "cache_implementation": "hybrid",
    "eos_token_id": 1,
    "final_logit_softcapping": 30.0,
    "head_dim": 256,
    "hidden_act": "gelu_pytorch_tanh",
    "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 3584,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 8192,
    "model_type": "gemma2",
    "num_attention_heads": 16,
    "num_hidden_layers": 42,
    "num_key_value_heads": 8,
    "pad_token_id": 0,
    "query_pre_attn_scalar": 256,
    "rms_norm_eps": 1e-06,
    "rope_theta": 10000.0,
    "sliding_window": 4096,
    "sliding_window_size": 4096,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": 256000,
}
# Its fields at CPU-smoke size, with a window (8) shorter than the smoke's prompts plus outputs.
GEMMA2_SMOKE = {
    **GEMMA2_9B,
    "head_dim": 64,
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "query_pre_attn_scalar": 64,
    "sliding_window": 8,
    "sliding_window_size": 8,
    "vocab_size": 4096,
}
PRESETS = {
    "llama3-8b": LLAMA3_8B,
    "smoke": SMOKE,
    "mixtral-4l": MIXTRAL_4L,
    "mixtral-smoke": MIXTRAL_SMOKE,
    "gemma2-9b": GEMMA2_9B,
    "gemma2-smoke": GEMMA2_SMOKE,
}
GEMMA_TYPES = ("gemma2", "gemma3_text")
"""Families whose norms scale by (1 + w): their norm weights are written as zeros (transformers' init), not ones."""


def tensor_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every checkpoint tensor of a Llama, Mixtral or Gemma 2 config, HF names, in file order."""
    h, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    head_dim = config.get("head_dim") or h // config["num_attention_heads"]
    q_out, kv_out = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, h)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q_out, h),
            p + "self_attn.k_proj.weight": (kv_out, h),
            p + "self_attn.v_proj.weight": (kv_out, h),
            p + "self_attn.o_proj.weight": (h, q_out),
            p + "post_attention_layernorm.weight": (h,),
        }
        if config["model_type"] in GEMMA_TYPES:  # norms before and after the MLP too
            shapes |= {p + "pre_feedforward_layernorm.weight": (h,), p + "post_feedforward_layernorm.weight": (h,)}
        if "num_local_experts" in config:  # Mixtral: the router, then each expert's gate (w1), down (w2), up (w3)
            moe = p + "block_sparse_moe."
            shapes[moe + "gate.weight"] = (config["num_local_experts"], h)
            for e in range(config["num_local_experts"]):
                shapes |= {
                    f"{moe}experts.{e}.w1.weight": (inter, h),
                    f"{moe}experts.{e}.w2.weight": (h, inter),
                    f"{moe}experts.{e}.w3.weight": (inter, h),
                }
        else:
            shapes |= {
                p + "mlp.gate_proj.weight": (inter, h),
                p + "mlp.up_proj.weight": (inter, h),
                p + "mlp.down_proj.weight": (h, inter),
            }
    shapes["model.norm.weight"] = (h,)
    # Gemma's config.json leaves tie_word_embeddings to the class default, which is True.
    if not config.get("tie_word_embeddings", config["model_type"] in GEMMA_TYPES):
        shapes["lm_head.weight"] = (vocab, h)
    return shapes


def plan_shards(shapes: dict[str, tuple[int, ...]], shard_bytes: int) -> list[list[str]]:
    """Consecutive tensors grouped into shards of at most `shard_bytes` (a larger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = 2 * math.prod(shape)
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def safetensors_header(names: list[str], shapes: dict[str, tuple[int, ...]]) -> bytes:
    """The 8-byte length and JSON header of a bf16 safetensors file, padded to 8 bytes as the library does."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in names:
        end = offset + 2 * math.prod(shapes[name])
        header[name] = {"dtype": "BF16", "shape": list(shapes[name]), "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def _write_shard(
    path: Path,
    names: list[str],
    shapes: dict[str, tuple[int, ...]],
    seed: int,
    device: torch.device,
    norm_value: float = 1.0,
) -> int:
    """Stream one shard: header, then each tensor drawn in row chunks on `device` and copied out."""
    staging = None
    if device.type == "cuda":
        staging = torch.empty(CHUNK_ELEMENTS, dtype=torch.bfloat16, pin_memory=True)  # [chunk] host bounce buffer
    written = 0
    with open(path, "wb") as f:
        f.write(safetensors_header(names, shapes))
        for name in names:
            shape = shapes[name]
            # A seed per tensor name: every tensor differs, and the same preset and seed give the same folder.
            gen = torch.Generator(device=device).manual_seed(seed << 32 | zlib.crc32(name.encode()))
            row = math.prod(shape[1:])
            rows_per_chunk = max(1, CHUNK_ELEMENTS // row)
            for start in range(0, shape[0], rows_per_chunk):
                rows = min(rows_per_chunk, shape[0] - start)
                if name.endswith("norm.weight"):
                    chunk = torch.full((rows * row,), norm_value, dtype=torch.bfloat16, device=device)  # [rows * row]
                else:
                    chunk = torch.empty(rows * row, dtype=torch.bfloat16, device=device)  # [rows * row]
                    chunk.normal_(0.0, WEIGHT_STD, generator=gen)
                if staging is not None:
                    host = staging[: chunk.numel()]
                    host.copy_(chunk)  # synchronous: the buffer is reused for the next chunk
                else:
                    host = chunk
                f.write(host.view(torch.uint8).numpy().data)
                written += host.numel() * 2
    return written


def build(out_dir: Path, preset: str = "llama3-8b", device: str = "cuda", seed: int = 0, shard_gb: float = 2.0) -> dict:
    """Write config.json, generation_config.json and sharded random weights; returns what build.json records."""
    config = PRESETS[preset]
    key = {"format": FORMAT_VERSION, "preset": preset, "seed": seed, "config": config}
    marker = out_dir / BUILD_FILE
    if marker.is_file():
        previous = json.loads(marker.read_text())
        if previous.get("key") == key:
            return {**previous, "reused": True}
    out_dir.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    started = time.perf_counter()
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    eos = config["eos_token_id"]
    generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": eos, "do_sample": False}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    shapes = tensor_shapes(config)
    shards = plan_shards(shapes, int(shard_gb * 2**30))
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for stale in out_dir.glob("model*.safetensors"):
        stale.unlink()
    with ThreadPoolExecutor(max_workers=min(len(shards), 8)) as pool:
        norm_value = 0.0 if config["model_type"] in GEMMA_TYPES else 1.0
        jobs = [
            pool.submit(_write_shard, out_dir / f, names, shapes, seed, dev, norm_value)
            for f, names in zip(files, shards)
        ]
        total = sum(job.result() for job in jobs)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
    weight_map = {name: f for f, names in zip(files, shards) for name in names}
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    seconds = time.perf_counter() - started
    record = {
        "key": key,
        "model_dir": str(out_dir),
        "device": str(dev),
        "weight_bytes": total,
        "embedding_bytes": 2 * math.prod(shapes["model.embed_tokens.weight"]),
        # MoE: the routed experts' bytes, of which a token reads top_k / num_experts
        "expert_bytes": 2 * sum(math.prod(shape) for name, shape in shapes.items() if ".experts." in name),
        "num_tensors": len(shapes),
        "num_shards": len(shards),
        "build_s": round(seconds, 2),
        "write_gbs": round(total / seconds / 1e9, 2),
        "reused": False,
    }
    check_headers(out_dir)
    marker.write_text(json.dumps(record, indent=2) + "\n")
    return record


def check_headers(model_dir: Path) -> None:
    """Every shard opens with the safetensors library and holds exactly the tensors the config implies."""
    from safetensors import safe_open

    config = json.loads((model_dir / "config.json").read_text())
    expected = tensor_shapes(config)
    index = json.loads((model_dir / INDEX_FILE).read_text())["weight_map"]
    found: dict[str, tuple[int, ...]] = {}
    for name in sorted(set(index.values())):
        with safe_open(str(model_dir / name), framework="pt") as f:
            for key in f.keys():
                found[key] = tuple(f.get_slice(key).get_shape())
    if found != expected:
        raise ValueError(f"{model_dir}: shard contents do not match the config ({len(found)} vs {len(expected)})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="llama3-8b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-gb", type=float, default=2.0)
    parser.add_argument("--json", type=Path, help="also write the build record here")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: pass --device cpu", file=sys.stderr)
        return 2
    record = build(args.out_dir, args.preset, args.device, args.seed, args.shard_gb)
    how = "reused" if record["reused"] else f"built in {record['build_s']} s ({record['write_gbs']} GB/s)"
    print(
        f"model folder {record['model_dir']}: {record['weight_bytes'] / 1e9:.2f} GB in "
        f"{record['num_shards']} shards, {how}"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
