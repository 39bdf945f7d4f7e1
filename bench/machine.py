"""The machine a benchmark ran on, and the load other processes put on it (wait until quiet, sample during runs).

"Other" means every process that is neither this harness nor one of its descendants (the servers it started).
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

import psutil

QUIET_CPU_PERCENT = 30.0


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _package_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def machine_info() -> dict[str, Any]:
    """CPU model, cores, memory, library versions and the date, for the results file."""
    return {
        "cpu_model": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": _package_version("torch"),
        "transformers": _package_version("transformers"),
        "tokenizers": _package_version("tokenizers"),
        "git_commit": _git_commit(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "loadavg_at_start": list(os.getloadavg()),
    }


class OtherCpuSampler:
    """Per-process CPU% of processes outside this harness's own tree, from successive psutil samples."""

    def __init__(self) -> None:
        self._me = psutil.Process()
        self._procs: dict[int, psutil.Process] = {}

    def sample(self) -> tuple[float, str]:
        """Return (highest CPU% of one other process since the last call, its name)."""
        own = {self._me.pid} | {child.pid for child in self._me.children(recursive=True)}
        top, top_name = 0.0, ""
        seen = set()
        for proc in psutil.process_iter():
            if proc.pid in own:
                continue
            seen.add(proc.pid)
            cached = self._procs.setdefault(proc.pid, proc)
            try:
                percent = cached.cpu_percent(None)  # 0.0 on the first call for a process
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            if percent > top:
                top, top_name = percent, _describe(cached)
        self._procs = {pid: p for pid, p in self._procs.items() if pid in seen}
        return top, top_name


def _describe(proc: psutil.Process) -> str:
    try:
        return f"{proc.pid} {' '.join(proc.cmdline())[:100]}"
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return str(proc.pid)


@dataclass(slots=True)
class LoadRecord:
    waited_s: float
    was_quiet: bool  # False when the wait timed out
    loadavg_1m_start: float
    loadavg_1m_end: float = 0.0
    other_cpu_max_percent: float = 0.0
    other_cpu_mean_percent: float = 0.0
    busiest_other: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def wait_quiet(timeout_s: float, threshold: float = QUIET_CPU_PERCENT, settle_samples: int = 3) -> LoadRecord:
    """Block until no other process uses more than `threshold`% CPU for `settle_samples` seconds (or timeout)."""
    sampler = OtherCpuSampler()
    sampler.sample()
    began = time.monotonic()
    calm = 0
    while calm < settle_samples:
        if time.monotonic() - began > timeout_s:
            return LoadRecord(time.monotonic() - began, False, os.getloadavg()[0])
        time.sleep(1.0)
        top, _ = sampler.sample()
        calm = calm + 1 if top <= threshold else 0
    return LoadRecord(time.monotonic() - began, True, os.getloadavg()[0])


class LoadMonitor:
    """Samples other processes' CPU once a second in a thread while a measurement runs."""

    def __init__(self, record: LoadRecord, interval_s: float = 1.0) -> None:
        self.record = record
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="load-monitor", daemon=True)
        self._samples: list[float] = []

    def _run(self) -> None:
        sampler = OtherCpuSampler()
        sampler.sample()
        while not self._stop.wait(self._interval):
            top, name = sampler.sample()
            self._samples.append(top)
            if top >= self.record.other_cpu_max_percent:
                self.record.other_cpu_max_percent, self.record.busiest_other = top, name

    def __enter__(self) -> LoadMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self.record.loadavg_1m_end = os.getloadavg()[0]
        if self._samples:
            self.record.other_cpu_mean_percent = sum(self._samples) / len(self._samples)
