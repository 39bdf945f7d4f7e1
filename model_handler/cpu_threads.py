"""CPU settings of the engine process, applied once at start-up: torch's thread count and glibc's malloc.

Threads: ENGINE_CPU_THREADS, default every CPU the process may run on: even with the HTTP worker beside the engine,
using every core wins under load; fewer only help when another process keeps a core busy all the time (OpenMP
waits on a descheduled thread). Allocator: glibc returns freed multi-MiB blocks to the kernel and faults them in
again on the next touch, so a prefill step's activations paid for page faults every step; keeping them mapped
avoids that.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # glibc mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 256 << 20
"""Blocks below this come from the heap, not a fresh mapping (the KV cache and weights are larger)."""
TRIM_THRESHOLD_BYTES = 1 << 30
"""Free heap kept mapped before glibc gives memory back: more than a step's transient tensors."""


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_num_threads(device_type: str = "cpu") -> int | None:
    """ENGINE_CPU_THREADS when unset: every available CPU for a CPU engine, None (torch's choice) for a GPU one."""
    return available_cpus() if device_type == "cpu" else None


def keep_freed_memory_mapped() -> bool:
    """Raise glibc's mmap and trim thresholds (no-op elsewhere); True when glibc took them."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )


def configure_engine_process(num_threads: int | None, device_type: str = "cpu") -> int:
    """Apply both before the model loads (`num_threads` None keeps torch's default); returns the torch
    thread count now in use."""
    import torch

    if num_threads is not None:
        torch.set_num_threads(num_threads)
    if device_type == "cpu":
        try:
            torch.set_num_interop_threads(1)  # the engine runs one op at a time; no inter-op pool needed
        except RuntimeError:  # the pool already started in this process
            pass
        keep_freed_memory_mapped()
    logger.info("torch threads: %d (ENGINE_CPU_THREADS)", torch.get_num_threads())
    return torch.get_num_threads()
