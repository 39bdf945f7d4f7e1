"""Small host tensors (step inputs, per-row sampling parameters) to the device without a hidden wait."""

from __future__ import annotations

import torch


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` on `device`. On CUDA through pinned memory with a non-blocking copy: a copy from pageable memory
    would wait for the work already queued on the stream (the forward just launched). On CPU, `t` itself."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
