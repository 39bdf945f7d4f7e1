"""Sizing and allocation of the paged KV cache: one tensor, a (k, v) view pair per layer.

CPU: as many blocks as KV_CACHE_CPU_BYTES holds. CUDA: what is left of CUDA_MEMORY_FRACTION of the device
after the weights and the peak of a warm-up forward at the largest batch.
"""

from __future__ import annotations

import torch

KVCache = tuple[torch.Tensor, torch.Tensor]


def block_bytes(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes of one block across all layers, keys and values."""
    return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def num_cpu_blocks(budget_bytes: int, bytes_per_block: int, max_useful_blocks: int) -> int:
    """Blocks that fit the CPU budget, never more than every sequence at full length could use."""
    num_blocks = min(budget_bytes // bytes_per_block, max_useful_blocks)
    if num_blocks < 1:
        raise ValueError(
            f"KV_CACHE_CPU_BYTES={budget_bytes} holds no KV block; one block needs {bytes_per_block} bytes"
        )
    return num_blocks


def num_cuda_blocks(device: torch.device, fraction: float, bytes_per_block: int, transient_bytes: int = 0) -> int:
    """Blocks that fit in `fraction` of the device after the model and the warm-up's peak.

    Call after a warm-up forward at the largest batch; `transient_bytes` is memory that was part of the
    peak but will not exist at serving time (the warm-up's own scratch KV cache).
    """
    free, total = torch.cuda.mem_get_info(device)
    used_by_others = (total - free) - torch.cuda.memory_reserved(device)  # other processes, CUDA context
    peak = torch.cuda.max_memory_allocated(device) - transient_bytes
    available = int(total * fraction) - used_by_others - peak
    num_blocks = available // bytes_per_block
    if num_blocks < 1:
        raise ValueError(
            f"no GPU memory left for the KV cache: {total / 2**30:.1f} GiB total, CUDA_MEMORY_FRACTION={fraction}, "
            f"peak use {peak / 2**30:.1f} GiB; raise CUDA_MEMORY_FRACTION or lower MAX_BATCH_PREFILL_TOKENS"
        )
    return num_blocks


def allocate(
    num_layers: int,
    num_blocks: int,
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[torch.Tensor, list[KVCache]]:
    """Zeroed cache (unused slots must not hold NaNs that a masked read could pick up) and per-layer views."""
    cache = torch.zeros(
        2, num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, device=device
    )  # [2, layers, num_blocks, block_size, num_kv_heads, head_dim]
    return cache, [(cache[0, i], cache[1, i]) for i in range(num_layers)]
