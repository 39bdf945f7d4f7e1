"""Safetensors checkpoints (one file or sharded with an index) -> model parameters.

HF tensor names are mapped onto our fused parameters through the model's `packed_modules_mapping` (and, for
MoE models, `checkpoint_renames` and `expert_modules_mapping`, which stack `experts.N.<proj>` per layer);
each parameter's `weight_loader` cuts its tensor-parallel shard and converts the dtype. Every parameter (and
every shard of a fused one) must be filled exactly once, and every checkpoint tensor must land somewhere.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from model_handler.layers.linear import default_weight_loader
from model_handler.startup_progress import ByteProgress

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of a model folder: the index's shards, else model.safetensors."""
    model_dir = Path(model_dir)
    index = model_dir / INDEX_FILE
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing = [str(f.name) for f in files if not f.is_file()]
        if missing:
            raise ValueError(f"{index} names shard files that are absent: {', '.join(missing)}")
        return files
    if (model_dir / SINGLE_FILE).is_file():
        return [model_dir / SINGLE_FILE]
    raise ValueError(
        f"no safetensors weights in {model_dir}: expected {SINGLE_FILE} or {INDEX_FILE} "
        "(pytorch_model.bin checkpoints are not supported)"
    )


def checkpoint_bytes(model_dir: str | Path) -> int:
    """The checkpoint's size on disk: what loading it reads."""
    return sum(path.stat().st_size for path in checkpoint_files(model_dir))


def iter_checkpoint(model_dir: str | Path, progress: ByteProgress | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of the checkpoint, on CPU, one file open at a time; `progress` advances
    by each tensor's bytes, and by each file's header once the file is done."""
    for path in checkpoint_files(model_dir):
        remaining = path.stat().st_size
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                yield name, tensor
                if progress is not None:
                    num_bytes = tensor.numel() * tensor.element_size()
                    progress.advance(num_bytes)
                    remaining -= num_bytes
        if progress is not None:
            progress.advance(remaining)


def _renamed(name: str, renames: dict[str, str]) -> str:
    """`name` with every dotted component in `renames` replaced (Mixtral's block_sparse_moe -> mlp)."""
    if not renames:
        return name
    return ".".join(renames.get(part, part) for part in name.split("."))


def _target(
    name: str, packed: dict[str, tuple[str, object]], experts: dict[str, tuple[str, str]] | None = None
) -> tuple[str, object]:
    """Our parameter name and shard id for an HF tensor name.

    `...experts.<N>.<proj>.weight` with <proj> in `experts` goes to the layer's stacked parameter
    `...experts.<stacked>` with shard id (N, role); that is checked first, because Qwen's experts reuse the
    dense MLP's projection names, which `packed` maps."""
    parts = name.split(".")
    if (
        experts
        and len(parts) >= 4
        and parts[-1] == "weight"
        and parts[-4] == "experts"
        and parts[-3].isdigit()
        and parts[-2] in experts
    ):
        stacked, role = experts[parts[-2]]
        return ".".join([*parts[:-3], stacked]), (int(parts[-3]), role)
    for i, part in enumerate(parts):
        if part in packed:
            fused, shard_id = packed[part]
            return ".".join([*parts[:i], fused, *parts[i + 1 :]]), shard_id
    return name, None


def _hf_names(
    param_name: str,
    shard_id: object,
    packed: dict[str, tuple[str, object]],
    experts: dict[str, tuple[str, str]] | None = None,
) -> str:
    """The checkpoint name that should have filled (param_name, shard_id), for error messages."""
    if shard_id is None:
        return param_name
    if experts and isinstance(shard_id, tuple):
        prefix, _, stacked = param_name.rpartition(".")
        for proj, target in experts.items():
            if target == (stacked, shard_id[1]):
                return f"{prefix}.{shard_id[0]}.{proj}.weight"
    for hf_module, (fused, sid) in packed.items():
        if sid == shard_id and f".{fused}." in f".{param_name}":
            return param_name.replace(fused, hf_module)
    return f"{param_name}[{shard_id}]"


def load_weights(model: nn.Module, model_dir: str | Path, progress: ByteProgress | None = None) -> None:
    """Fill every parameter of `model` from the checkpoint in `model_dir`; ValueError names what is off.
    `progress` (sized by `checkpoint_bytes`) counts the bytes read."""
    packed: dict[str, tuple[str, object]] = getattr(model, "packed_modules_mapping", {})
    experts: dict[str, tuple[str, str]] = getattr(model, "expert_modules_mapping", {})
    renames: dict[str, str] = getattr(model, "checkpoint_renames", {})
    ignored: tuple[str, ...] = getattr(model, "ignored_weight_suffixes", ())
    params = dict(model.named_parameters())  # a tied lm_head shares embed_tokens' Parameter: listed once
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)

    expected: set[tuple[str, object]] = set()
    for param_name, param in params.items():
        module_name = param_name.split(".")[-2] if "." in param_name else ""
        # A stacked parameter lists its own shards (every expert's projections); a fused one's follow `packed`.
        shard_ids = getattr(param, "expected_shards", None) or [
            sid for fused, sid in packed.values() if fused == module_name
        ]
        expected.update((param_name, sid) for sid in (shard_ids or [None]))

    loaded: set[tuple[str, object]] = set()
    unexpected: list[str] = []
    for name, tensor in iter_checkpoint(model_dir, progress):
        if name.endswith(ignored) or (tied and name == "lm_head.weight"):
            continue
        param_name, shard_id = _target(_renamed(name, renames), packed, experts)
        param = params.get(param_name)
        if param is None:
            unexpected.append(name)
            continue
        loader = getattr(param, "weight_loader", default_weight_loader)
        try:
            with torch.no_grad():
                loader(param, tensor, shard_id)
        except ValueError as exc:
            raise ValueError(f"checkpoint weight {name!r} does not fit {param_name!r}: {exc}") from exc
        loaded.add((param_name, shard_id))

    if unexpected:
        raise ValueError(
            f"checkpoint in {model_dir} has weights the model does not use: {', '.join(sorted(unexpected)[:10])}"
            + (f" (and {len(unexpected) - 10} more)" if len(unexpected) > 10 else "")
        )
    to_checkpoint = {ours: theirs for theirs, ours in renames.items()}
    missing = sorted(_renamed(_hf_names(p, s, packed, experts), to_checkpoint) for p, s in expected - loaded)
    if missing:
        raise ValueError(
            f"checkpoint in {model_dir} is missing weights: {', '.join(missing[:10])}"
            + (f" (and {len(missing) - 10} more)" if len(missing) > 10 else "")
        )
