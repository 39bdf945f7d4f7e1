"""Model folder -> our model module on the device, weights loaded, eval mode."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from model_handler.kernels import AttentionBackend
from model_handler.model_config import ModelConfig, load_hf_config
from model_handler.models import get_model_class
from model_handler.models.causal_lm import CausalLM
from model_handler.startup_progress import ByteProgress
from model_handler.weights import load_weights


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def load_model(
    model_dir: str | Path,
    *,
    dtype: torch.dtype,
    device: torch.device,
    attention_backend: AttentionBackend,
    tp_rank: int = 0,
    tp_size: int = 1,
    model_config: ModelConfig | None = None,
    progress: ByteProgress | None = None,
) -> CausalLM:
    """Build the registered class for the folder's architecture and fill it from its safetensors.

    Parameters are created directly on `device` in `dtype` (no CPU copy of the whole model first);
    `tp_rank`/`tp_size` select this rank's shard of every parallel layer. `model_config`: the folder's config
    when the caller has read it already; `progress` counts the checkpoint's bytes as they are read.
    """
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank {tp_rank} is outside 0..{tp_size - 1}")
    if not dtype.is_floating_point:
        raise ValueError(f"model dtype must be a floating point type, got {dtype}")
    config = model_config if model_config is not None and model_config.hf_config is not None else None
    if config is None:
        config = ModelConfig.from_hf_config(load_hf_config(model_dir), model_dir)
    hf_config = config.hf_config
    model_class = get_model_class(config.architecture)
    with torch.device(device), _default_dtype(dtype):
        model = model_class(hf_config, config, attention_backend, tp_rank=tp_rank, tp_size=tp_size)
    load_weights(model, model_dir, progress)
    return model.eval()
