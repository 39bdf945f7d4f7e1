"""bench/gpu_kernels.py parses its arguments without a GPU and its checks pass under the interpreter."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[3] / "bench" / "gpu_kernels.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_kernels_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_help_runs_as_a_plain_script():
    result = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "--device" in result.stdout and "--small" in result.stdout and "--out" in result.stdout


def test_small_checks_pass_on_cpu_and_write_json(tmp_path):
    out = tmp_path / "kernels.json"
    assert load_script().main(["--device", "cpu", "--small", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["passed"] is True
    names = {check["name"] for check in results["checks"]}
    assert {"decode b=1 no split", "extend (cached prefix + new)", "mixed decode + prefill rows"} <= names
    assert all(check["finite"] for check in results["checks"])
    assert results["timings"] == []  # timing needs CUDA


def test_cuda_without_a_device_exits_2(capsys):
    import torch

    if torch.cuda.is_available():
        return
    assert load_script().main(["--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err
