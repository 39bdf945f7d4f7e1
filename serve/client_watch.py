"""Noticing that the client of a non-streaming request left while the request waits for the engine.

A stream notices a gone client at its next write, within a step; a reply sent whole at the end writes nothing
until then, so its connection is watched instead: the client closing it (EOF) or resetting it ends the wait at
once, the engine requests are aborted (their KV blocks free at the next step) and the request is logged as
abandoned (status 499). A client that half-closes its side after sending the request counts as gone, as hyper
(TGI's HTTP server) counts it by default. Bytes of a pipelined next request end the watch (nothing past them can
be seen). Outside the gunicorn worker (a Flask test client) there is no socket and nothing is watched.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import gevent
import gevent.socket

from serve.errors import ApiError, ErrorKind

T = TypeVar("T")


def run_while_client_stays(work: Callable[[], T], environ: Mapping[str, Any]) -> T:
    """`work()`, ended early (killed in its greenlet, so its `finally` blocks abort what it started) with
    ApiError(CLIENT_GONE) if the request's client leaves meanwhile."""
    sock = environ.get("gunicorn.socket")
    if sock is None:
        return work()
    worker = gevent.spawn(_captured, work)
    watcher = gevent.spawn(client_left, sock)
    try:
        gevent.wait([worker, watcher], count=1)
        if not worker.ready() and watcher.ready() and watcher.value:
            worker.kill()
            raise ApiError(ErrorKind.CLIENT_GONE, "the client closed the connection before the reply was ready")
        result, error = worker.get()
    finally:
        watcher.kill(block=False)
        worker.kill()
    if error is not None:
        raise error
    return result


def client_left(sock: Any) -> bool:
    """Wait until the connection has something to read: True when that is its end (closed or reset by the
    client), False when it is data (a pipelined request)."""
    try:
        gevent.socket.wait_read(sock.fileno())
        return not sock.recv(1, socket.MSG_PEEK)
    except OSError:
        return True


def _captured(work: Callable[[], T]) -> tuple[T | None, Exception | None]:
    """The result or the exception, handed to the waiting greenlet (gevent would print an uncaught one)."""
    try:
        return work(), None
    except Exception as exc:
        return None, exc
