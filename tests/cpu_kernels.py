"""Whether the C++ CPU kernels are expected here: a CPU-only machine with a C++ compiler, or with a prebuilt
library that fits its CPU ($CPU_KERNELS_PREBUILT_DIR).

Tests key on the compiler, not on `cpu_native.load()`, so a kernel source that stops compiling fails them
instead of quietly switching every engine to the torch path.
"""

from __future__ import annotations

import shutil

import torch
from torch.utils.cpp_extension import get_cxx_compiler

from model_handler.kernels import cpu_prebuilt


def has_compiler() -> bool:
    return shutil.which(get_cxx_compiler()) is not None


def expected() -> bool:
    if torch.cuda.is_available():
        return False
    return has_compiler() or cpu_prebuilt.usable_level() is not None


def expected_backend() -> str:
    """The attention backend a CPU engine picks by default here."""
    return "cpu" if expected() else "torch"
