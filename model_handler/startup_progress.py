"""What start-up tells its log while `/ping` still answers 503: bytes done of total, and each phase's duration.

A SageMaker user sees only the endpoint's CloudWatch log while the health check waits, so the Hub download and
the weight loading log their progress as JSON lines every STARTUP_PROGRESS_SECONDS (and a bar on a terminal),
and every phase (download, load, warm-up, KV sizing, CUDA graphs) logs how long it took.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

logger = logging.getLogger("model_handler.startup")


def format_bytes(num_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(num_bytes) < 1024 or unit == "GiB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    return f"{num_bytes:.1f} GiB"  # pragma: no cover - the loop always returns


class ByteProgress:
    """Bytes done of a known total for one phase: a JSON log line when it starts, at most one every
    `interval_s` while it runs, and one when it ends; a tqdm bar on stderr when that is a terminal.

    Thread-safe: the Hub download's progress comes from a polling thread."""

    def __init__(self, phase: str, what: str, total_bytes: int, interval_s: float) -> None:
        self.phase, self.what, self.total_bytes = phase, what, total_bytes
        self.interval_s = interval_s
        self.bytes_done = 0
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self._last_log = self._started
        self._bar = _terminal_bar(phase, total_bytes)
        self._log("started")

    def advance(self, num_bytes: int) -> None:
        with self._lock:
            self._set(self.bytes_done + num_bytes)

    def update_to(self, bytes_done: int) -> None:
        """Report an absolute count (what a poller measures); it never goes backwards."""
        with self._lock:
            if bytes_done > self.bytes_done:
                self._set(bytes_done)

    def close(self) -> None:
        with self._lock:
            self._set(self.total_bytes, log=False)
            self._log("done")
            if self._bar is not None:
                self._bar.close()

    def __enter__(self) -> ByteProgress:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None):
        if exc_type is None:
            self.close()
        elif self._bar is not None:
            self._bar.close()

    def _set(self, bytes_done: int, log: bool = True) -> None:
        bytes_done = min(bytes_done, self.total_bytes)
        if self._bar is not None:
            self._bar.update(bytes_done - self.bytes_done)
        self.bytes_done = bytes_done
        now = time.monotonic()
        if log and now - self._last_log >= self.interval_s:
            self._log("running")

    def _log(self, state: str) -> None:
        self._last_log = time.monotonic()
        elapsed = self._last_log - self._started
        percent = 100.0 * self.bytes_done / self.total_bytes if self.total_bytes else 100.0
        logger.info(
            "%s: %s of %s (%.0f%%) after %.1f s",
            self.what,
            format_bytes(self.bytes_done),
            format_bytes(self.total_bytes),
            percent,
            elapsed,
            extra={
                "phase": self.phase,
                "progress": state,
                "bytes_done": self.bytes_done,
                "bytes_total": self.total_bytes,
                "percent": round(percent, 1),
                "elapsed_seconds": round(elapsed, 2),
            },
        )


def _terminal_bar(phase: str, total_bytes: int) -> Any:
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc=phase, file=sys.stderr)


@dataclass(slots=True)
class StartupPhases:
    """How long each start-up phase took, logged as each ends ("phase done") and kept for the ready line."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def phase(self, name: str, **fields: Any) -> Iterator[None]:
        logger.info("start-up phase %s: started", name, extra={"phase": name, "progress": "started", **fields})
        started = time.monotonic()
        yield
        elapsed = time.monotonic() - started
        self.seconds[name] = self.seconds.get(name, 0.0) + elapsed
        logger.info(
            "start-up phase %s: done in %.2f s",
            name,
            elapsed,
            extra={"phase": name, "progress": "done", "seconds": round(elapsed, 3), **fields},
        )

    def summary(self) -> dict[str, float]:
        return {name: round(seconds, 3) for name, seconds in self.seconds.items()}
