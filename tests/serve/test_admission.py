"""The server-wide admission table (serve/admission.py) with real processes sharing one file, as gunicorn's
forked workers do: the limit holds for all of them together, a worker that dies holding requests is forgotten by
the master's hook, and rows of processes that are gone are reused."""

from __future__ import annotations

import multiprocessing
import os

import pytest

from serve.admission import LocalAdmission, SharedAdmission, admission_for, create_table, forget_worker, table_rows

FORK = multiprocessing.get_context("fork")  # gunicorn forks its workers


def _acquire_in_child(path: str, limit: int, count: int, results, release: bool) -> None:
    admission = SharedAdmission(path, limit)
    results.put([admission.try_acquire() for _ in range(count)])
    if release:
        admission.release()
    os._exit(0)  # no cleanup of any kind: as a killed worker leaves things


def _run_child(path: str, limit: int, count: int, release: bool = False) -> tuple[int, list[bool]]:
    results = FORK.SimpleQueue()
    child = FORK.Process(target=_acquire_in_child, args=(path, limit, count, results, release))
    child.start()
    admitted = results.get()
    child.join(30)
    assert child.exitcode == 0
    return child.pid, admitted


@pytest.fixture
def table(tmp_path):
    path = str(tmp_path / "admission")
    create_table(path, num_workers=2)
    return path


def test_the_limit_holds_across_processes(table):
    parent = SharedAdmission(table, limit=5)
    assert parent.try_acquire() and parent.try_acquire()
    _, first = _run_child(table, 5, 2)
    _, second = _run_child(table, 5, 2)
    assert first == [True, True]
    assert second == [True, False]  # 2 + 2 + 1 = 5: the fifth and last place
    assert parent.in_flight() == 5 and not parent.try_acquire()
    parent.release()
    assert parent.in_flight() == 4 and parent.try_acquire()


def test_a_dead_workers_requests_are_forgotten(table):
    admission = SharedAdmission(table, limit=3)
    pid, admitted = _run_child(table, 3, 3)  # exits holding all three
    assert admitted == [True, True, True]
    assert admission.in_flight() == 3 and not admission.try_acquire()
    forget_worker(table, pid)  # gunicorn's child_exit in the master
    assert admission.in_flight() == 0
    assert [admission.try_acquire() for _ in range(4)] == [True, True, True, False]


def test_rows_of_processes_that_are_gone_are_reused(table):
    """The master missed clearing them (it never does while alive): a full table still admits a new worker."""
    dead = [_run_child(table, 10**6, 1, release=True)[0] for _ in range(table_rows(2))]
    assert len(set(dead)) == table_rows(2)  # every row is taken by a process that exited
    admission = SharedAdmission(table, limit=10**6)
    assert admission.try_acquire() and admission.in_flight() == 1


def test_a_forked_child_counts_in_its_own_row(table):
    admission = SharedAdmission(table, limit=2)
    assert admission.try_acquire()
    results = FORK.SimpleQueue()

    def child() -> None:  # the same object, inherited: it must open the table again, not share the parent's lock
        results.put(admission.try_acquire())
        os._exit(0)

    process = FORK.Process(target=child)
    process.start()
    assert results.get() is True
    process.join(30)
    forget_worker(table, process.pid)
    assert admission.in_flight() == 1  # the parent's request still counts; the child's went with its row


def test_without_a_table_the_count_is_local():
    admission = admission_for(2, None)
    assert isinstance(admission, LocalAdmission)
    assert [admission.try_acquire() for _ in range(3)] == [True, True, False]
    admission.release()
    assert admission.try_acquire()


def test_forgetting_after_the_launcher_cleaned_up_is_harmless(tmp_path):
    forget_worker(str(tmp_path / "removed-at-shutdown"), 12345)  # workers exiting after the socket dir is gone
