"""MAX_CONCURRENT_REQUESTS for the whole server, however many gunicorn workers share it.

Each worker is its own process and the kernel hands a new connection to whichever worker accepts first, often
the same one many times in a row; a per-worker share of the limit therefore turned requests away while the
server had room (on an H100 at 128 streams with two workers: 192 of 256 requests got 429). So the workers count
in one table: a small file the launcher creates, mapped into every worker, one row (pid, in flight) per worker.
An flock makes check-and-count atomic (the kernel releases it if its holder dies mid-way), and the gunicorn
master clears a dead worker's row, so requests it held stop counting.

Without a table (one worker run in-process, as the tests' apps are) the count is local.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import psutil

_ROW = struct.Struct("=qq")  # pid, requests in flight


def table_rows(num_workers: int) -> int:
    """Room for every worker and the replacements gunicorn starts before it has reaped the ones they replace."""
    return max(64, 4 * num_workers)


def create_table(path: str, num_workers: int) -> None:
    """The launcher's part: an all-zero table (no worker, nothing in flight)."""
    with open(path, "wb") as table:
        table.write(bytes(_ROW.size * table_rows(num_workers)))


class LocalAdmission:
    """The count of one process (no table): a lock and an integer."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._in_flight = 0

    def try_acquire(self) -> bool:
        with self._lock:
            if self._in_flight >= self.limit:
                return False
            self._in_flight += 1
            return True

    def release(self) -> None:
        with self._lock:
            self._in_flight -= 1


class SharedAdmission:
    """The server-wide count in the table at `path`; each process opens it on first use (after gunicorn's fork)."""

    def __init__(self, path: str, limit: int) -> None:
        self.path = path
        self.limit = limit
        self._opened_by: int | None = None
        self._fd = -1
        self._map: mmap.mmap | None = None
        self._row: int | None = None

    def try_acquire(self) -> bool:
        with self._locked() as table:
            if self._total(table) >= self.limit:
                return False
            self._add(table, 1)
            return True

    def release(self) -> None:
        with self._locked() as table:
            self._add(table, -1)

    def in_flight(self) -> int:
        """Requests in flight on the whole server."""
        with self._locked() as table:
            return self._total(table)

    # ---- the table -----------------------------------------------------------------------------

    @contextmanager
    def _locked(self) -> Iterator[mmap.mmap]:
        table = self._open()
        fcntl.flock(self._fd, fcntl.LOCK_EX)  # held for microseconds: a sum over a few dozen rows
        try:
            yield table
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _open(self) -> mmap.mmap:
        pid = os.getpid()
        if self._opened_by != pid:  # first use in this process; an flock must not be shared with the parent's fd
            self._fd = os.open(self.path, os.O_RDWR)
            self._map = mmap.mmap(self._fd, 0)
            self._opened_by, self._row = pid, None
        return self._map

    @staticmethod
    def _total(table: mmap.mmap) -> int:
        return sum(count for pid, count in _ROW.iter_unpack(table) if pid)

    def _add(self, table: mmap.mmap, delta: int) -> None:
        if self._row is None:
            self._row = _claim_row(table, self._opened_by)
        offset = self._row * _ROW.size
        pid, count = _ROW.unpack_from(table, offset)
        _ROW.pack_into(table, offset, pid, count + delta)


def _claim_row(table: mmap.mmap, pid: int) -> int:
    """A free row (or the row of a process that no longer exists) for `pid`; called with the table locked."""
    rows = list(_ROW.iter_unpack(table))
    free = next((i for i, (owner, _) in enumerate(rows) if owner == 0), None)
    if free is None:  # the master missed clearing some rows (it was killed?): take one whose owner is gone
        free = next((i for i, (owner, _) in enumerate(rows) if not psutil.pid_exists(owner)), None)
    if free is None:
        raise RuntimeError(f"the admission table has no free row for worker {pid} ({len(rows)} rows, all live)")
    _ROW.pack_into(table, free * _ROW.size, pid, 0)
    return free


def admission_for(limit: int, path: str | None) -> LocalAdmission | SharedAdmission:
    """The server-wide table when the launcher made one, else a count of this process."""
    return SharedAdmission(path, limit) if path else LocalAdmission(limit)


def forget_worker(path: str, pid: int) -> None:
    """The gunicorn master's part when a worker exits: its row, and the requests it counted, are freed."""
    try:
        file = open(path, "r+b")
    except FileNotFoundError:  # the launcher has already cleaned up (workers exiting at shutdown)
        return
    with file:
        fcntl.flock(file.fileno(), fcntl.LOCK_EX)
        try:
            with mmap.mmap(file.fileno(), 0) as table:
                for index, (owner, _) in enumerate(_ROW.iter_unpack(table)):
                    if owner == pid:
                        _ROW.pack_into(table, index * _ROW.size, 0, 0)
        finally:
            fcntl.flock(file.fileno(), fcntl.LOCK_UN)
