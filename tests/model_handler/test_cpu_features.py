"""The native-bf16 probe against the kernel's own CPU flags, so a broken probe fails instead of quietly turning
the CPU default into fp32 and the bf16 linears back to F.linear. The flags come from /proc/cpuinfo: the project
runs on Linux only (README), so the oracle is always there."""

from __future__ import annotations

import platform
from pathlib import Path

import torch

from model_handler.cpu_features import has_native_bf16

CPUINFO = Path("/proc/cpuinfo")


def kernel_cpu_flags() -> set[str]:
    for line in CPUINFO.read_text().splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def test_native_bf16_probe_agrees_with_the_kernel_flags():
    x86_onednn = platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available()
    flags = kernel_cpu_flags()
    assert has_native_bf16() == (x86_onednn and bool({"avx512_bf16", "amx_tile"} & flags))
