"""What this CPU computes natively, read once: the choice of CPU dtype and CPU matmul kernels rests on it."""

from __future__ import annotations

import functools
import platform

import torch


@functools.cache
def is_x86_with_onednn() -> bool:
    """An x86 CPU and a torch built with oneDNN: where the packed CPU matmuls are used and tested."""
    return platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available()


@functools.cache
def has_native_bf16() -> bool:
    """True on x86 CPUs with AVX512-BF16 or AMX tiles, where oneDNN's bf16 matmuls run in hardware (faster than
    fp32, see cpu_linear.py's docstring); elsewhere bf16 would be emulated, slower than fp32. torch's probes are
    private, so a build without them counts as no."""
    if not is_x86_with_onednn():
        return False
    probes = (
        getattr(torch.cpu, "_is_avx512_bf16_supported", None),
        getattr(torch.cpu, "_is_amx_tile_supported", None),
    )
    try:
        return any(bool(probe()) for probe in probes if probe is not None)
    except RuntimeError:
        return False
