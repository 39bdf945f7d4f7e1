"""Which instruction-set level a CPU gets (`cpu_levels`), which prebuilt CPU-kernel library a process loads, and
when it loads none (then `cpu_native` compiles, or the torch path runs). The real build and load of a prebuilt
library: test_cpu_kernels_portable.py."""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model_handler.kernels import cpu_build, cpu_levels, cpu_prebuilt
from tests import cpu_kernels

REPO = Path(__file__).resolve().parents[3]

ALL = ["x86-64-v4-bf16", "x86-64-v4", "x86-64-v3"]
ZEN4 = cpu_levels.X86_LEVELS[0].requires | {"sse4_2", "avx512_vnni"}
SKYLAKE_SP = cpu_levels.X86_LEVELS[1].requires
ZEN3 = cpu_levels.X86_LEVELS[2].requires | {"sse4_2", "sha_ni"}


@pytest.mark.parametrize(
    ("flags", "names", "expected"),
    [
        (ZEN4, ALL, "x86-64-v4-bf16"),
        (SKYLAKE_SP, ALL, "x86-64-v4"),
        (ZEN3, ALL, "x86-64-v3"),
        (ZEN4, ["x86-64-v3"], "x86-64-v3"),  # only what the manifest lists
        (ZEN3, ["x86-64-v4-bf16", "x86-64-v4"], None),
        (ZEN3 - {"movbe"}, ALL, None),  # below x86-64-v3: nothing fits
    ],
)
def test_the_best_listed_level_this_cpu_can_run_is_chosen(flags, names, expected):
    chosen = cpu_levels.best_level(names, frozenset(flags), "x86_64")
    assert (chosen.name if chosen else None) == expected


def test_no_level_is_offered_outside_x86():
    assert cpu_levels.levels_for("aarch64") == ()
    assert cpu_levels.best_level(None, frozenset(ZEN4), "aarch64") is None


# Justified skip: the flag names checked are x86 Linux's (other systems have no /proc/cpuinfo or other names).
@pytest.mark.skipif(not (platform.machine() == "x86_64" and Path("/proc/cpuinfo").exists()), reason="x86 Linux")
def test_this_cpus_flags_are_read():
    assert "sse2" in cpu_levels.cpu_flags()  # every x86-64 CPU has SSE2


def write_folder(tmp_path, **overrides):
    manifest = {
        "torch": torch.__version__,
        "sources": cpu_build.source_digest(),
        "machine": "x86_64",
        "levels": ["x86-64-v3"],
        **overrides,
    }
    (tmp_path / cpu_prebuilt.MANIFEST).write_text(json.dumps(manifest))
    return tmp_path


def test_nothing_is_looked_for_without_the_variable(monkeypatch):
    monkeypatch.delenv("CPU_KERNELS_PREBUILT_DIR", raising=False)
    assert cpu_prebuilt.folder() is None
    assert cpu_prebuilt.usable_level() is None
    assert cpu_prebuilt.load() is False


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"torch": "2.0.0+cpu"}, "built for torch 2.0.0+cpu"),
        ({"sources": "0123456789abcdef"}, "built from other kernel sources"),
        ({"levels": ["x86-64-v5"]}, "runs on this CPU"),
        ({}, "x86-64-v3.so is missing"),  # where this CPU runs x86-64-v3 (any x86 server of the last decade)
    ],
)
def test_a_library_built_for_other_sources_torch_or_cpus_is_not_loaded(
    monkeypatch, tmp_path, caplog, overrides, reason
):
    if not overrides and cpu_levels.best_level(["x86-64-v3"], cpu_levels.cpu_flags(), platform.machine()) is None:
        overrides = {"levels": []}  # a CPU below x86-64-v3 (or not x86): nothing fits at all
        reason = "runs on this CPU"
    monkeypatch.setenv("CPU_KERNELS_PREBUILT_DIR", str(write_folder(tmp_path, **overrides)))
    assert cpu_prebuilt.usable_level() is None
    with caplog.at_level(logging.WARNING, logger=cpu_prebuilt.__name__):
        assert cpu_prebuilt.load() is False
    assert reason in caplog.text


def test_an_unreadable_manifest_is_reported(monkeypatch, tmp_path, caplog):
    (tmp_path / cpu_prebuilt.MANIFEST).write_text("{not json")
    monkeypatch.setenv("CPU_KERNELS_PREBUILT_DIR", str(tmp_path))
    with caplog.at_level(logging.WARNING, logger=cpu_prebuilt.__name__):
        assert cpu_prebuilt.load() is False
    assert "no readable manifest.json" in caplog.text


def test_unknown_level_names_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown levels"):
        cpu_prebuilt.prebuild(tmp_path, ["x86-64-v9"])


@pytest.mark.parametrize(("target", "expected"), [("x86-64-v3", "=x86-64-v3"), ("native", "=native")])
# Justified skip: -march/-mcpu are only emitted on x86 and ARM; elsewhere no target flag exists to check.
@pytest.mark.skipif(platform.machine() not in ("x86_64", "aarch64"), reason="the targets are x86 or ARM names")
def test_a_named_target_is_compiled_for_in_its_own_folder(monkeypatch, target, expected):
    monkeypatch.delenv("CPU_KERNELS_TARGET", raising=False)
    auto_key = cpu_build.build_key()
    monkeypatch.setenv("CPU_KERNELS_TARGET", target)
    assert cpu_build.target_flags() == [("-march" if platform.machine() == "x86_64" else "-mcpu") + expected]
    assert cpu_build.build_key() != auto_key


def test_the_first_use_build_targets_the_level_the_image_would_load(monkeypatch):
    monkeypatch.delenv("CPU_KERNELS_TARGET", raising=False)
    level = cpu_levels.best_level(None, cpu_levels.cpu_flags(), platform.machine())
    native = f"-m{'arch' if platform.machine() == 'x86_64' else 'cpu'}=native"
    expected = list(level.target_flags) if level else [native]
    assert cpu_build.target() == "auto" and cpu_build.target_flags() == expected
    if platform.machine() == "x86_64" and "avx512_bf16" in cpu_levels.cpu_flags():  # this EPYC: the bf16 level
        assert cpu_build.target_flags() == ["-march=x86-64-v4", "-mavx512bf16"]


# Justified skip: the fallback is a compile, so it needs a compiler, and (as every CPU-kernel test) a CPU machine.
@pytest.mark.skipif(not (cpu_kernels.expected() and cpu_kernels.has_compiler()), reason="GPU machine, or no compiler")
def test_a_prebuilt_library_that_does_not_load_is_compiled_instead(tmp_path):
    """A damaged file where the manifest promises a library: the engine still gets the kernels (the first-use
    build, here the one this test run already made) instead of failing or silently taking the torch path."""
    level = cpu_levels.best_level(None, cpu_levels.cpu_flags(), platform.machine())
    if level is None:
        pytest.skip("no prebuilt level runs on this CPU")  # justified: only x86-64-v3 and up have levels
    write_folder(tmp_path, levels=[level.name])
    (tmp_path / f"{level.name}.so").write_bytes(b"not a shared library")
    probe = "from model_handler.kernels import cpu_native; print('loaded', cpu_native.load())"
    env = {**os.environ, "CPU_KERNELS_PREBUILT_DIR": str(tmp_path)}
    run = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "loaded True" in run.stdout
    assert "prebuilt C++ CPU kernels failed to load" in run.stderr
