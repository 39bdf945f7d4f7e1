"""Build and load the C++ CPU kernels (`csrc/`: paged decode and prefill attention, fused elementwise ops) once per
machine, through torch's JIT extension builder; `load()` says False where that cannot be done (no compiler, an
unsupported platform), and the CPU path stays on plain torch.

Built at first use rather than at install: the kernels are compiled for the best instruction-set level the CPU
runs (`cpu_levels`), and the build folder is keyed by the sources, the torch version and the CPU's model and
flags, so a cache shared between different machines never hands one a binary for another. A build takes ~15 s
on 2 cores; later starts load the cached library. Concurrent builders (tensor-parallel ranks, test processes)
are serialised by torch's lock file in the build folder. Images without a compiler load a library built ahead
of time (`cpu_prebuilt`).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
from pathlib import Path

import torch

from model_handler.kernels import cpu_levels

logger = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")
SOURCES = (CSRC / "cpu_attention.cpp", CSRC / "cpu_prefill_attention.cpp", CSRC / "cpu_elementwise.cpp")
HEADERS = (CSRC / "cpu_math.h", CSRC / "cpu_paged_checks.h")
OP_NAMESPACE = "sagemaker_llm_cpu"
BUILD_DIR_ENV = "CPU_KERNELS_BUILD_DIR"
"""Where builds go; default `<model cache root>/cpu-kernels` (TINY_MODEL_CACHE or ~/.cache/sagemaker-llm)."""
TARGET_ENV = "CPU_KERNELS_TARGET"
"""The CPU the kernels are compiled for: `auto` (default; see `target_flags`), or a gcc -march (x86) / -mcpu (ARM)."""


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
    return os.environ.get(TARGET_ENV, "").strip() or "auto"


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
    from model_handler.tiny_model import cache_root

    root = Path(os.environ.get(BUILD_DIR_ENV) or cache_root() / "cpu-kernels").expanduser()
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
    os.environ["PATH"] = os.pathsep.join(filter(None, (ninja.BIN_DIR, os.environ.get("PATH"))))


OPS = (
    "paged_decode_attention",
    "paged_prefill_attention",
    "paged_prefill_attention_is_vectorized",
    "add_rms_norm",
    "silu_and_mul",
    "rotary_",
)


def registered() -> bool:
    namespace = getattr(torch.ops, OP_NAMESPACE)
    return all(hasattr(namespace, op) for op in OPS)


@functools.cache
def load() -> bool:
    """Register `torch.ops.sagemaker_llm_cpu`: from a prebuilt library that fits this CPU (`cpu_prebuilt`, in
    images without a compiler), else by building (or loading the cached build of) the kernels here; False,
    with the reason logged, where neither works."""
    from model_handler.kernels import cpu_prebuilt

    if registered():
        return True
    try:
        if cpu_prebuilt.load():
            if not registered():
                raise RuntimeError(f"the prebuilt library registered no torch.ops.{OP_NAMESPACE} op")
            return True
    except Exception as exc:  # noqa: BLE001 - a prebuilt library that does not load: compile instead
        logger.warning("prebuilt C++ CPU kernels failed to load, compiling them: %s", _first_line(exc))
    try:
        build(SOURCES, build_dir())
        if not registered():
            raise RuntimeError(f"the library loaded but registered no torch.ops.{OP_NAMESPACE} op")
    except Exception as exc:  # noqa: BLE001 - any build or load failure means: use the torch path
        logger.warning("C++ CPU kernels unavailable, using the torch path: %s", _first_line(exc))
        return False
    logger.info("C++ CPU kernels loaded from %s", build_dir())
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
