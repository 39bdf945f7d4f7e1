"""Load the C++ CPU kernels (`csrc/`: paged decode and prefill attention, fused elementwise ops) and call them;
`load()` says False where that cannot be done (no compiler, an unsupported platform), and the CPU path stays on
plain torch.

Loaded from a library built ahead of time where one fits this CPU (`cpu_prebuilt`, in images without a
compiler), else built once per machine at first use through torch's JIT extension builder (`cpu_build`), for
the best instruction-set level the CPU runs; later starts load the cached build.
"""

from __future__ import annotations

import functools
import logging

import torch

from model_handler.kernels import cpu_build, cpu_prebuilt

logger = logging.getLogger(__name__)

OPS = (
    "paged_decode_attention",
    "paged_prefill_attention",
    "paged_prefill_attention_is_vectorized",
    "add_rms_norm",
    "silu_and_mul",
    "rotary_",
)


def registered() -> bool:
    namespace = getattr(torch.ops, cpu_build.OP_NAMESPACE)
    return all(hasattr(namespace, op) for op in OPS)


@functools.cache
def load() -> bool:
    """Register `torch.ops.sagemaker_llm_cpu`: from a prebuilt library that fits this CPU (`cpu_prebuilt`, in
    images without a compiler), else by building (or loading the cached build of) the kernels here; False,
    with the reason logged, where neither works."""
    if registered():
        return True
    try:
        if cpu_prebuilt.load():
            if not registered():
                raise RuntimeError(f"the prebuilt library registered no torch.ops.{cpu_build.OP_NAMESPACE} op")
            return True
    except Exception as exc:  # noqa: BLE001 - a prebuilt library that does not load: compile instead
        logger.warning("prebuilt C++ CPU kernels failed to load, compiling them: %s", _first_line(exc))
    try:
        cpu_build.build(cpu_build.SOURCES, cpu_build.build_dir())
        if not registered():
            raise RuntimeError(f"the library loaded but registered no torch.ops.{cpu_build.OP_NAMESPACE} op")
    except Exception as exc:  # noqa: BLE001 - any build or load failure means: use the torch path
        logger.warning("C++ CPU kernels unavailable, using the torch path: %s", _first_line(exc))
        return False
    logger.info("C++ CPU kernels loaded from %s", cpu_build.build_dir())
    return True


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def paged_decode_attention(
    out: torch.Tensor,  # [T, H, D] contiguous
    query: torch.Tensor,  # [T, H, D], rows may be strided
    k_cache: torch.Tensor,  # [num_blocks, block_size, H_kv, D]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32
    query_rows: torch.Tensor,  # [n] int64: the query token of each decode row
    seq_rows: torch.Tensor,  # [n] int64: the sequence it attends over
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> None:
    """out[query_rows[i]] = softmax(q k^T * scale) v over sequence seq_rows[i]'s first seq_lens tokens (the last
    `sliding_window` of them with a window; logits soft-capped with `softcap`)."""
    torch.ops.sagemaker_llm_cpu.paged_decode_attention(
        out,
        query,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        query_rows,
        seq_rows,
        scale,
        sliding_window or 0,
        softcap or 0.0,
    )


def paged_prefill_attention(
    out: torch.Tensor,  # [T, H, D] contiguous
    query: torch.Tensor,  # [T, H, D], rows may be strided
    k_cache: torch.Tensor,  # [num_blocks, block_size, H_kv, D]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32
    prefills: torch.Tensor,  # [P, 4] int64: (query start, query length, sequence length, block table row)
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> None:
    """Each prompt's query rows attend causally over its sequence's cached tokens (the prompt's own included), within
    `sliding_window` when given, logits soft-capped with `softcap`."""
    torch.ops.sagemaker_llm_cpu.paged_prefill_attention(
        out, query, k_cache, v_cache, block_tables, prefills, scale, sliding_window or 0, softcap or 0.0
    )


def paged_prefill_attention_is_vectorized() -> bool:
    """Whether the prefill kernel was built with its AVX-512 tiles (without them SDPA is faster)."""
    return bool(torch.ops.sagemaker_llm_cpu.paged_prefill_attention_is_vectorized())
