"""The C++ CPU kernels built for CPUs without AVX-512 (x86-64-v3: AVX2, as on many AMD and older Intel instances)
pass the same kernel tests as the native build. This machine has AVX-512, so the native build never runs the
plain-loop paths; this builds them (~20 s) and runs the kernel test modules against them in a child pytest."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from model_handler.kernels import cpu_native
from tests import cpu_kernels

REPO = Path(__file__).resolve().parents[3]
MODULES = ("test_cpu_backend.py", "test_cpu_prefill_attention.py", "test_cpu_fused.py")

# Justified skips: a GPU machine or no C++ compiler (as test_cpu_backend.py); `x86-64-v3` is an x86 build level;
# inside the child run itself this module has nothing more to check.
pytestmark = [
    pytest.mark.skipif(not cpu_kernels.expected(), reason="GPU machine, or no C++ compiler"),
    pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86 build levels only"),
    pytest.mark.skipif(cpu_native.target() != "native", reason="already the portable build"),
]


def test_the_build_without_avx512_passes_the_kernel_tests(tmp_path):
    env = {**os.environ, cpu_native.TARGET_ENV: "x86-64-v3", cpu_native.BUILD_DIR_ENV: str(tmp_path)}
    here = Path(__file__).parent
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *(str(here / m) for m in MODULES)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    tail = (run.stdout + run.stderr)[-4000:]
    assert run.returncode == 0, tail
    assert " passed" in tail and "failed" not in tail, tail
    assert list(tmp_path.iterdir()), "the child run did not build into its own folder"
