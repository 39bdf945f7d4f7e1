"""Configuration is declared once (`model_handler/envs.py`): the README's table is that declaration, nothing
else in the container reads the environment, and every declared variable is used."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from model_handler import envs

REPO = Path(__file__).resolve().parents[1]
CONTAINER_CODE = ("serve", "model_handler", "container")


def _readme_table() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Configuration", 1)[1].split("\n## ", 1)[0]
    return [line.strip() for line in section.splitlines() if line.startswith("|")]


def test_readme_table_is_the_declaration():
    """Same variables, same defaults, same meanings, same order: regenerate with `python -m model_handler.envs`."""
    assert _readme_table() == envs.markdown_table().splitlines()


def _python_files() -> list[Path]:
    files = [p for package in CONTAINER_CODE for p in (REPO / package).rglob("*.py")]
    return files + [REPO / "container" / "serve"]


def _environment_reads(path: Path) -> list[str]:
    where = path.relative_to(REPO) if path.is_relative_to(REPO) else path.name
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "os":
            if node.attr in ("environ", "environb", "getenv", "getenvb", "putenv", "unsetenv"):
                found.append(f"{where}:{node.lineno} os.{node.attr}")
        if isinstance(node, ast.ImportFrom) and node.module == "os":
            names = {alias.name for alias in node.names} & {"environ", "getenv", "environb", "getenvb"}
            found += [f"{where}:{node.lineno} from os import {name}" for name in sorted(names)]
    return found


def test_no_module_but_the_declaration_touches_the_environment():
    offenders = [read for path in _python_files() if path.name != "envs.py" for read in _environment_reads(path)]
    assert offenders == []


def test_the_check_finds_an_environment_read(tmp_path):
    """The scan above would see the ways code reads the environment."""
    sample = tmp_path / "sample.py"
    sample.write_text("import os\nfrom os import getenv\na = os.environ.get('X')\nb = os.getenv('Y')\n")
    assert len(_environment_reads(sample)) == 3


def test_every_variable_that_is_read_is_used_somewhere():
    """A declared variable that no code reads would be documented and silently ignored."""
    code = "\n".join(p.read_text() for p in _python_files() if p.name != "envs.py")
    unused = [
        v.name
        for v in envs.VARIABLES
        if v.read_by != "–" and f'"{v.name}"' not in code and not re.search(rf"\benvs\.{v.name}\b", code)
    ]
    assert unused == []


def test_values_are_typed_and_bad_ones_name_the_variable():
    environ = {"MAX_BATCH_SIZE": " 12 ", "PREFIX_CACHING": "off", "KV_CACHE_CPU_BYTES": "512MiB", "DTYPE": "BF16"}
    assert envs.get(environ, "MAX_BATCH_SIZE") == 12
    assert envs.get(environ, "PREFIX_CACHING") is False
    assert envs.get(environ, "KV_CACHE_CPU_BYTES") == 512 << 20
    assert envs.get(environ, "DTYPE") == "bfloat16"
    assert envs.get({"SEED": ""}, "SEED") == 0  # empty counts as unset: SageMaker sends some variables empty
    for name, value, message in [
        ("MAX_BATCH_SIZE", "many", "MAX_BATCH_SIZE='many' must be an integer"),
        ("MAX_BATCH_SIZE", "0", "MAX_BATCH_SIZE=0 must be at least 1"),
        ("PORT", "70000", "PORT=70000 must be at most 65535"),
        ("PREFIX_CACHING", "maybe", "PREFIX_CACHING='maybe' must be true or false"),
        ("CUDA_MEMORY_FRACTION", "half", "CUDA_MEMORY_FRACTION='half' must be a number"),
        ("DTYPE", "int8", "DTYPE='int8' must be one of auto, float16, bfloat16, float32"),
        ("LOG_LEVEL", "loud", "LOG_LEVEL='loud' must be a log level"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            envs.get({name: value}, name)
    with pytest.raises(KeyError, match="not declared"):
        envs.get({}, "NOT_A_VARIABLE")


def test_attribute_access_reads_this_process_environment(monkeypatch):
    monkeypatch.setenv("CPU_KERNELS_TARGET", "x86-64-v3")
    assert envs.CPU_KERNELS_TARGET == "x86-64-v3"
    monkeypatch.delenv("CPU_KERNELS_TARGET")
    assert envs.CPU_KERNELS_TARGET == "auto"
