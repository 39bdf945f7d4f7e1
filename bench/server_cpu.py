"""CPU seconds a server's processes spent during a measurement, split by role: engine, HTTP workers, the rest.

Why: on a shared 2-core machine the HTTP workers and the engine compete for the same cores, and on a GPU box
one gunicorn worker is a ceiling on streamed tokens/s; CPU time per output token says where the cost is.
Roles come from command lines: the engine (`model_handler.server`, tensor-parallel ranks), gunicorn's workers
(a gunicorn process whose parent is gunicorn), everything else (launcher, arbiter, a one-process baseline).
"""

from __future__ import annotations

from collections.abc import Iterable

import psutil

ROLES = ("engine", "http", "rest")


def _cmdline(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return ""


def role_of(proc: psutil.Process) -> str:
    command = _cmdline(proc)
    if "model_handler.server" in command or "model_handler.tp_worker" in command:
        return "engine"
    if "gunicorn" in command:
        try:
            parent = proc.parent()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            parent = None
        if parent is not None and "gunicorn" in _cmdline(parent):
            return "http"
    return "rest"


def _tree(root_pid: int) -> Iterable[psutil.Process]:
    try:
        root = psutil.Process(root_pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def cpu_seconds_by_role(root_pid: int) -> dict[str, dict[int, float]]:
    """Per role, each live process's user+system CPU seconds so far (keyed by pid: processes come and go)."""
    seconds: dict[str, dict[int, float]] = {role: {} for role in ROLES}
    for proc in _tree(root_pid):
        try:
            times = proc.cpu_times()
            seconds[role_of(proc)][proc.pid] = times.user + times.system
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return seconds


def cpu_spent(before: dict[str, dict[int, float]], after: dict[str, dict[int, float]]) -> dict[str, float]:
    """CPU seconds per role between two snapshots; a process that started in between counts from zero."""
    return {
        role: sum(total - before.get(role, {}).get(pid, 0.0) for pid, total in after.get(role, {}).items())
        for role in ROLES
    }
