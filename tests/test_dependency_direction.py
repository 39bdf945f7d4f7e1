"""The dependency direction is serve -> model_handler, never back; the HTTP side never imports torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _imported_modules(package: str) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in (REPO / package).rglob("*.py"):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
        found[str(path.relative_to(REPO))] = names
    return found


@pytest.mark.parametrize("forbidden", ["serve", "flask", "gevent", "gunicorn", "zmq.green"])
def test_model_handler_never_imports_the_http_side(forbidden):
    offenders = {
        path: sorted(n for n in names if n == forbidden or n.startswith(forbidden + "."))
        for path, names in _imported_modules("model_handler").items()
    }
    assert not {p: n for p, n in offenders.items() if n}


def test_serve_never_imports_torch_directly():
    offenders = {p: n for p, n in _imported_modules("serve").items() if any(x.split(".")[0] == "torch" for x in n)}
    assert not offenders


def test_loading_the_app_leaves_torch_out_of_the_http_worker():
    code = "import sys, serve.app, serve.engine_client; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
