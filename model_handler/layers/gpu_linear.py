"""Linear layers on CUDA: cuBLAS, or for one-row inputs the Triton GEMV where it was measured faster.

The choice is made once per weight shape, the first time a one-row input meets it outside a CUDA-graph
capture (the model runner's one-token warm-up forward at start-up), by timing cuBLAS and every
`triton_gemv.CONFIGS` entry on that weight with the L2 cache flushed (Triton's `do_bench`). A config
whose output disagrees with cuBLAS is never chosen. The choices are logged and kept in `choices()`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from model_handler.kernels.triton_gemv import GemvConfig

logger = logging.getLogger(__name__)

CUBLAS = "cublas"


@dataclass(frozen=True, slots=True)
class Choice:
    """What runs a one-row product with this weight, and what each candidate measured (ms)."""

    shape: tuple[int, int]  # (N, K)
    dtype: str
    winner: GemvConfig | str  # a Triton config or CUBLAS
    timings_ms: dict[str, float]


_choices: dict[tuple, Choice] = {}


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, weight, bias) on CUDA through the faster of cuBLAS and the Triton GEMV for one row."""
    if not _gemv_applies(x, weight, bias):
        return F.linear(x, weight, bias)
    key = (tuple(weight.shape), weight.dtype, bias is not None, x.device)
    choice = _choices.get(key)
    if choice is None:
        if torch.cuda.is_current_stream_capturing():  # no timing inside a capture; cuBLAS is always right
            return F.linear(x, weight, bias)
        choice = _choices[key] = measure(x, weight, bias)
    if choice.winner == CUBLAS:
        return F.linear(x, weight, bias)
    from model_handler.kernels import triton_gemv

    return triton_gemv.gemv(x, weight, bias, choice.winner)


def _gemv_applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return (
        x.dim() == 2
        and x.shape[0] == 1
        and x.dtype == weight.dtype
        and weight.dtype in (torch.bfloat16, torch.float16)
        and weight.dim() == 2
        and x.stride(1) == 1
        and weight.stride(1) == 1
        and (bias is None or bias.is_contiguous())
        and not x.requires_grad
    )


def measure(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> Choice:
    """Time cuBLAS and each GEMV config on this weight; the fastest correct one wins."""
    n, k = weight.shape
    dtype = str(weight.dtype).removeprefix("torch.")
    try:
        from triton.testing import do_bench

        from model_handler.kernels import triton_gemv
    except ImportError as exc:  # a torch build without Triton: cuBLAS it is
        logger.warning("one-row linears stay on cuBLAS: Triton is not importable (%s)", exc)
        return Choice((n, k), dtype, CUBLAS, {})

    def timer(fn: Callable[[], torch.Tensor]) -> float:
        return float(do_bench(fn, warmup=5, rep=25, return_mode="median"))

    candidates: dict[object, Callable[[], torch.Tensor]] = {CUBLAS: lambda: F.linear(x, weight, bias)}
    for config in triton_gemv.CONFIGS:
        candidates[config] = lambda config=config: triton_gemv.gemv(x, weight, bias, config)
    winner, timings = fastest_correct(candidates, timer, reference=CUBLAS)
    choice = Choice((n, k), dtype, winner, timings)
    ms, cublas_ms = timings.get(str(winner), float("nan")), timings.get(CUBLAS, float("nan"))
    logger.info(
        "one-row linear %dx%d %s: %s, %.4f ms (%.0f GB/s); cuBLAS %.4f ms",
        n,
        k,
        dtype,
        winner,
        ms,
        weight.numel() * weight.element_size() / (ms * 1e6),
        cublas_ms,
    )
    return choice


def fastest_correct(
    candidates: dict[object, Callable[[], torch.Tensor]],
    timer: Callable[[Callable[[], torch.Tensor]], float],
    reference: object,
) -> tuple[object, dict[str, float]]:
    """(the fastest candidate whose output matches `reference`'s, {str(candidate): time}).

    A candidate that raises (a config this GPU cannot compile) or computes something else is skipped."""
    expected = candidates[reference]().float()
    scale = expected.abs().max().item() or 1.0
    timings: dict[str, float] = {}
    best, best_time = reference, None
    for name, fn in candidates.items():
        try:
            if name != reference and not torch.allclose(fn().float(), expected, rtol=2e-2, atol=2e-2 * scale):
                logger.warning("one-row linear: %s disagrees with %s; not used", name, reference)
                continue
            elapsed = timer(fn)
        except Exception as exc:  # noqa: BLE001 - a config that fails to build is just not a candidate
            logger.warning("one-row linear: %s failed (%s); not used", name, exc)
            continue
        timings[str(name)] = round(elapsed, 5)
        if best_time is None or elapsed < best_time:
            best, best_time = name, elapsed
    return best, timings


def choices() -> list[Choice]:
    """The choices made so far in this process (for logs and benchmark records)."""
    return list(_choices.values())
