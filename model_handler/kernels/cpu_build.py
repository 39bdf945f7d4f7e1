"""How the C++ CPU kernels (`csrc/`) are compiled: their sources, flags and target CPU, and the folder a first-use
build goes to. Shared by the loader (`cpu_native`) and the ahead-of-time builds (`cpu_prebuilt`).

A build folder is keyed by the sources, the torch version and the CPU's model and flags, so a cache shared
between different machines never hands one a binary for another. Concurrent builders (tensor-parallel ranks,
test processes) are serialised by torch's lock file in the build folder.
"""

from __future__ import annotations

import hashlib
import platform
import shutil
from pathlib import Path

import torch

from model_handler import envs
from model_handler.kernels import cpu_levels

CSRC = Path(__file__).with_name("csrc")
SOURCES = (CSRC / "cpu_attention.cpp", CSRC / "cpu_prefill_attention.cpp", CSRC / "cpu_elementwise.cpp")
HEADERS = (CSRC / "cpu_math.h", CSRC / "cpu_paged_checks.h")
OP_NAMESPACE = "sagemaker_llm_cpu"


def _cpu_fingerprint() -> str:
    """The CPU's model name and feature flags (Linux), or the machine name elsewhere."""
    fields = cpu_levels.cpuinfo()
    return platform.machine() + "|".join(fields.get(key, "") for key in ("model name", "flags", "Features", "CPU part"))


def base_cflags() -> list[str]:
    """-O3; -fopenmp so at::parallel_for runs on torch's OpenMP threads (without it the header compiles to a
    serial loop); no trapping math or errno, so loops with a compare or a float-to-int cast (the softmax's exp)
    vectorize. No -ffast-math: results keep IEEE rounding."""
    return ["-O3", "-fopenmp", "-fno-trapping-math", "-fno-math-errno"]


def _cflags() -> list[str]:
    """The base flags for the CPU named by `target()`."""
    return [*base_cflags(), *target_flags()]


def target() -> str:
    """CPU_KERNELS_TARGET: `auto` (see `target_flags`), or a gcc -march (x86) / -mcpu (ARM)."""
    return envs.CPU_KERNELS_TARGET


def target_flags() -> list[str]:
    """`auto`: the best `cpu_levels` level this CPU runs (what the image ships, see there), else the CPU itself;
    any other value: gcc's -march (x86) or -mcpu (ARM)."""
    machine = platform.machine().lower()
    name = target()
    if name == "auto":
        level = cpu_levels.best_level(None, cpu_levels.cpu_flags(), machine)
        if level is not None:
            return list(level.target_flags)
        name = "native"
    if machine in ("x86_64", "amd64"):
        return [f"-march={name}"]
    if machine in ("aarch64", "arm64"):
        return [f"-mcpu={name}"]
    return []


def source_digest() -> str:
    """The kernel sources and headers, by content."""
    digest = hashlib.sha256()
    for path in (*SOURCES, *HEADERS):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def build_key() -> str:
    """Sources, their folder (torch's builder rebuilds when the source paths change, so two checkouts sharing a
    folder would rebuild in turn), torch version, CPU and flags."""
    digest = hashlib.sha256(str(CSRC.resolve()).encode())
    for part in (source_digest(), torch.__version__, _cpu_fingerprint(), str(_cflags())):
        digest.update(part.encode())
    return digest.hexdigest()[:16]


def build_dir() -> Path:
    """CPU_KERNELS_BUILD_DIR (default `<TINY_MODEL_CACHE>/cpu-kernels`), one folder per `build_key()`."""
    root = Path(envs.CPU_KERNELS_BUILD_DIR or Path(envs.TINY_MODEL_CACHE) / "cpu-kernels").expanduser()
    return root / build_key()


def build(sources: tuple[Path, ...], directory: Path) -> None:
    """Compile `sources` into `directory` (or reuse the build there) and load them into this process; raises on
    a failed compile or load."""
    from torch.utils import cpp_extension

    put_ninja_on_path()
    directory.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(
        name=f"{OP_NAMESPACE}_{directory.name}",
        sources=[str(source) for source in sources],
        extra_cflags=_cflags(),
        build_directory=str(directory),
        is_python_module=False,
        verbose=False,
    )


def put_ninja_on_path() -> None:
    """torch's builder runs `ninja` from PATH; the `ninja` package (a dependency) installs it next to this
    Python, which is not on PATH when the venv is not activated (`make test`, the launcher)."""
    if shutil.which("ninja") is not None:
        return
    try:
        import ninja
    except ImportError:
        return
    envs.prepend_to_path(ninja.BIN_DIR)
