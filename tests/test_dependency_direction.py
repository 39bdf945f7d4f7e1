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
                # `from package import module` names the module too
                names.update(
                    f"{node.module}.{alias.name}"
                    for alias in node.names
                    if (REPO / node.module.replace(".", "/") / f"{alias.name}.py").is_file()
                )
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


TORCH_FREE_ENGINE_MODULES = {
    "model_handler",
    "model_handler.constraints",
    "model_handler.engine_protocol",
    "model_handler.envs",
    "model_handler.logging_setup",
    "model_handler.sampling_params",
}
"""The parts of the engine package the HTTP side may use: the seam's records and protocols, the configuration
declaration and the log format. Nothing in them imports torch (checked below, transitively)."""


def _engine_modules_used_by_serve() -> set[str]:
    used = set()
    for names in _imported_modules("serve").values():
        for name in names:
            if name == "model_handler" or name.startswith("model_handler."):
                used.add(name)
    return used


def test_serve_uses_only_the_torch_free_parts_of_the_engine_package():
    used = _engine_modules_used_by_serve()
    assert used <= TORCH_FREE_ENGINE_MODULES, sorted(used - TORCH_FREE_ENGINE_MODULES)


def test_the_torch_free_parts_import_only_each_other_and_no_torch():
    imports = _imported_modules("model_handler")
    for module in sorted(TORCH_FREE_ENGINE_MODULES - {"model_handler"}):
        path = module.replace(".", "/") + ".py"
        names = imports[path]
        assert not any(n.split(".")[0] in ("torch", "triton", "numpy", "transformers") for n in names), path
        engine_names = {n for n in names if n.startswith("model_handler.")}
        assert engine_names <= TORCH_FREE_ENGINE_MODULES, (path, sorted(engine_names - TORCH_FREE_ENGINE_MODULES))


def test_loading_the_app_leaves_torch_out_of_the_http_worker():
    code = "import sys, serve.app, serve.engine_client; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def _module_graph() -> dict[str, set[str]]:
    """Every import between the project's modules, wherever it stands (module level, in a function, under
    TYPE_CHECKING); `from package import module` is an edge to the module, as importers see it."""
    files = {p for package in ("serve", "model_handler") for p in (REPO / package).rglob("*.py")}

    def name_of(path: Path) -> str:
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    modules = {name_of(p): p for p in files}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [
                    f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                    for alias in node.names
                ]
            else:
                continue
            edges.update(t for t in targets if t in modules and t != name)
        graph[name] = edges
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    assert _cycles(_module_graph()) == []


def test_the_cycle_check_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
