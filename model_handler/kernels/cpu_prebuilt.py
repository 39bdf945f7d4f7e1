"""The C++ CPU kernels compiled ahead of time, for images that carry no compiler.

Why: `cpu_native` compiles the kernels at first use for the CPU at hand, which needs a C++ compiler at run time.
The serving image has none (a compiler is ~200 MB, and a fresh SageMaker instance would spend its start-up
compiling), so without this a CPU container ran every attention and elementwise op on the plain torch path.
Instead the image build compiles the x86 levels of `cpu_levels` (`python -m model_handler.kernels.cpu_prebuilt
OUT_DIR`): AVX-512 with bf16 dot products, AVX-512, AVX2; at start-up `load()` picks the best one this CPU runs.
A manifest records the
torch version and the kernel sources the libraries were built from; a library built for other sources or
another torch is never loaded (`cpu_native` then compiles, or the torch path runs).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shutil
import tempfile
from pathlib import Path

import torch

from model_handler import envs
from model_handler.kernels import cpu_build, cpu_levels
from model_handler.kernels.cpu_levels import CpuLevel

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"


def prebuild(out_dir: Path, names: list[str] | None = None) -> list[str]:
    """Compile the kernels once per level into `out_dir` (`<level>.so` + the manifest); returns the names.
    Nothing is loaded here, so a build host may lack the instructions it compiles for."""
    from setuptools import Distribution
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    cpu_build.put_ninja_on_path()
    levels = cpu_levels.levels_for(platform.machine())
    chosen = [level for level in levels if names is None or level.name in names]
    if names is not None and len(chosen) != len(names):
        unknown = sorted(set(names) - {level.name for level in chosen})
        raise ValueError(f"unknown levels {unknown}; this machine has {[level.name for level in levels]}")
    out_dir.mkdir(parents=True, exist_ok=True)
    for level in chosen:
        module = f"{cpu_build.OP_NAMESPACE}_{level.name.replace('-', '_')}"
        extension = CppExtension(
            module,
            [str(source) for source in cpu_build.SOURCES],
            # -g0: no debug info (0.3 MB a library, not 7.5)
            extra_compile_args=[*cpu_build.base_cflags(), *level.target_flags, "-g0"],
            py_limited_api=True,  # the kernels use only the dispatcher: no libtorch_python, no Python headers
        )
        distribution = Distribution(
            {"name": module, "ext_modules": [extension], "cmdclass": {"build_ext": BuildExtension}}
        )
        with tempfile.TemporaryDirectory(prefix="cpu-kernels-") as scratch:
            command = distribution.get_command_obj("build_ext")
            command.build_lib = str(Path(scratch) / "lib")
            command.build_temp = str(Path(scratch) / "obj")
            distribution.run_command("build_ext")
            shutil.copyfile(command.get_ext_fullpath(module), out_dir / f"{level.name}.so")
        logger.info("built the CPU kernels for %s", level.name)
    manifest = {
        "torch": torch.__version__,
        "sources": cpu_build.source_digest(),
        "machine": platform.machine(),
        "levels": [level.name for level in chosen],
    }
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest["levels"]


def folder() -> Path | None:
    """CPU_KERNELS_PREBUILT_DIR: a folder written by `python -m model_handler.kernels.cpu_prebuilt`; unset:
    nothing prebuilt is looked for."""
    value = envs.CPU_KERNELS_PREBUILT_DIR
    return Path(value) if value else None


def usable_level() -> CpuLevel | None:
    """The level `load()` would load, without loading it."""
    where = folder()
    choice = _choose(where) if where is not None else None
    return choice if isinstance(choice, CpuLevel) else None


def load() -> bool:
    """Load the best prebuilt library for this CPU from $CPU_KERNELS_PREBUILT_DIR; False (with the reason
    logged where a folder was given) when none fits."""
    where = folder()
    if where is None:
        return False
    choice = _choose(where)
    if isinstance(choice, str):
        logger.warning("prebuilt CPU kernels in %s not used: %s", where, choice)
        return False
    torch.ops.load_library(str(where / f"{choice.name}.so"))
    logger.info("C++ CPU kernels loaded: prebuilt %s from %s", choice.name, where)
    return True


def _choose(where: Path) -> CpuLevel | str:
    """The level to load from `where`, or why none of its libraries can serve this process."""
    try:
        manifest = json.loads((where / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        return f"no readable {MANIFEST} ({exc})"
    if manifest.get("torch") != torch.__version__:
        return f"built for torch {manifest.get('torch')}, this is {torch.__version__}"
    if manifest.get("sources") != cpu_build.source_digest():
        return "built from other kernel sources"
    level = cpu_levels.best_level(list(manifest.get("levels", [])), cpu_levels.cpu_flags(), platform.machine())
    if level is None:
        return f"none of {manifest.get('levels')} runs on this CPU ({platform.machine()})"
    if not (where / f"{level.name}.so").is_file():
        return f"{level.name}.so is missing"
    return level


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--levels", nargs="+", help="default: every level for this machine's architecture")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    built = prebuild(args.out_dir, args.levels)
    print(f"prebuilt CPU kernels in {args.out_dir}: {', '.join(built) or 'none for ' + platform.machine()}")


if __name__ == "__main__":
    main()
