"""The x86 instruction-set levels the C++ CPU kernels are compiled for, and which of them a CPU can run.

Why levels rather than `-march=native`: the serving image carries the kernels prebuilt (`cpu_prebuilt`), so the
code it runs must be compiled for levels, not for the build host; a first-use build on a machine with a compiler
(`cpu_native`) picks the same level by default, so tests run the code the image ships. On the Zen 4 machines
measured it was also faster than the `-march=native` build (bench/results/README.md has the figures).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

_X86_V3 = frozenset({"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"})
_X86_V4 = _X86_V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}


@dataclass(frozen=True)
class CpuLevel:
    """One build level: the compiler's target flags and the /proc/cpuinfo flags a CPU needs to run the result."""

    name: str
    target_flags: tuple[str, ...]
    requires: frozenset[str]


X86_LEVELS = (
    CpuLevel("x86-64-v4-bf16", ("-march=x86-64-v4", "-mavx512bf16"), _X86_V4 | {"avx512_bf16"}),
    CpuLevel("x86-64-v4", ("-march=x86-64-v4",), _X86_V4),
    CpuLevel("x86-64-v3", ("-march=x86-64-v3",), _X86_V3),
)
"""Best first: AVX-512 with bf16 dot products (Sapphire Rapids, Zen 4 and later), AVX-512 (Skylake-SP to Ice
Lake), AVX2 (Haswell, Zen 2/3). ARM has none yet: there builds are `-mcpu=native`."""


def levels_for(machine: str) -> tuple[CpuLevel, ...]:
    return X86_LEVELS if machine.lower() in ("x86_64", "amd64") else ()


def cpuinfo() -> dict[str, str]:
    """/proc/cpuinfo's fields for the first CPU (empty where it is not readable: not Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, colon, value = line.partition(":")
        if colon:
            fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags as Linux names them ("Features" on ARM)."""
    fields = cpuinfo()
    return frozenset((fields.get("flags") or fields.get("Features") or "").split())


def best_level(names: list[str] | None, flags: frozenset[str], machine: str) -> CpuLevel | None:
    """The best level among `names` (None: all of them) that a CPU with `flags` can run."""
    for level in levels_for(machine):
        if (names is None or level.name in names) and level.requires <= flags:
            return level
    return None
