"""Whether the C++ CPU kernels are expected to build here: a CPU-only machine with a C++ compiler.

Tests key on the compiler, not on `cpu_native.load()`, so a kernel source that stops compiling fails them
instead of quietly switching every engine to the torch path.
"""
from __future__ import annotations

import shutil

import torch
from torch.utils.cpp_extension import get_cxx_compiler


def expected() -> bool:
    return not torch.cuda.is_available() and shutil.which(get_cxx_compiler()) is not None


def expected_backend() -> str:
    """The attention backend a CPU engine picks by default here."""
    return "cpu" if expected() else "torch"
