"""Linear layers on x86 CPUs through oneDNN with the weight pre-packed once, instead of MKL's sgemm.

fp32: at serving batch sizes (a few to a few dozen rows) sgemm re-packs the weight on every call, which oneDNN's
packed matmul does once (`bench/engine_step.py` compares the two). Tiny products stay on F.linear, whose per-call
setup is lower. bf16 (on CPUs with native bf16 only, see cpu_features): the packed kernel is as fast or faster at
every product size that matters, and bf16 runs well above the fp32 rate. The packed copy is made on first use and
doubles the CPU memory of those weights; a changed weight (new storage or an in-place write) is packed again.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from model_handler.cpu_features import has_native_bf16, is_x86_with_onednn

MIN_WORK = {torch.float32: 1 << 20, torch.bfloat16: 0}
"""Per dtype, rows x weight elements below which F.linear is as fast as the packed kernel (none in bf16)."""
enabled = True
"""False keeps every CPU linear on F.linear (benchmarks flip it to compare)."""


@functools.cache
def packed_linear_available(dtype: torch.dtype = torch.float32) -> bool:
    """oneDNN is built in and works for `dtype`, and the CPU is x86 (elsewhere its kernels are untested
    here); for bf16 the CPU must also compute bf16 natively."""
    if not is_x86_with_onednn():
        return False
    if dtype not in MIN_WORK or (dtype == torch.bfloat16 and not has_native_bf16()):
        return False
    try:
        weight = torch.ones(4, 8, dtype=dtype)
        out = torch.ops.mkldnn._linear_pointwise(torch.ones(2, 8, dtype=dtype), _pack(weight), None, "none", [], "")
    except (RuntimeError, AttributeError):  # an op missing or unsupported in this build
        return False
    return out.dtype == dtype and bool(torch.equal(out, torch.full((2, 4), 8.0, dtype=dtype)))


def _pack(weight: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():  # the packed copy is a cache, never part of an autograd graph
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)


class PackedWeight:
    """A layer's weight packed for oneDNN, rebuilt when the weight's storage or version changes."""

    __slots__ = ("key", "packed")

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.packed: torch.Tensor | None = None

    def get(self, weight: torch.Tensor) -> torch.Tensor:
        try:
            version = weight._version
        except RuntimeError:  # an inference tensor keeps no version counter
            version = None
        key = (weight.data_ptr(), tuple(weight.shape), weight.dtype, version)
        if key != self.key or self.packed is None:
            self.packed = _pack(weight)
            self.key = key
        return self.packed


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, packed: PackedWeight) -> torch.Tensor:
    """F.linear(x, weight, bias), through the packed oneDNN kernel where that is faster."""
    if (
        x.device.type != "cpu"
        or x.dtype not in MIN_WORK
        or weight.dtype != x.dtype
        or x.numel() // max(x.shape[-1], 1) * weight.numel() < MIN_WORK[x.dtype]
        or x.requires_grad
        or not enabled
        or not packed_linear_available(x.dtype)
    ):
        return F.linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x, packed.get(weight), bias, "none", [], "")
