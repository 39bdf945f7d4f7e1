"""The client connections of one HTTP worker: which ones wait on their client, and closing those to make room.

A connection *waits* while the server waits for its client: idle (for a request's headers: a new connection, or
a kept-alive one after its reply) or for a request's body. A worker keeps at most WORKER_CONNECTIONS; one more
closes the connection that has waited longest, so idle or slow clients can never stop the worker from accepting
(and `/ping` from being answered). Connections being served are never closed here. While the worker stops, idle
connections are closed at once (they would hold the stop until they time out), and the rest once the grace
period is over.

gunicorn's worker (`serve/http_worker.py`) fills the table; the app marks a body read through `waiting_for_body`.
"""

from __future__ import annotations

import enum
import logging
import socket
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

logger = logging.getLogger("serve.connections")

ENVIRON_KEY = "serve.connections"
"""Where the worker puts its table in each request's WSGI environ (gunicorn puts the socket in `gunicorn.socket`)."""
EVICTION_LOG_INTERVAL_S = 10.0
SPARE_CONNECTIONS = 64
"""Room in gunicorn's pool past WORKER_CONNECTIONS: connections accepted while every other one is being served
(only a waiting connection can be closed to make room)."""


class Waiting(enum.Enum):
    IDLE = "idle"
    BODY = "body"


class ConnectionTable:
    """This worker's open client connections, the waiting ones in the order they began to wait."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._waiting: dict[Any, Waiting] = {}  # insertion order: longest waiting first
        self._busy: set[Any] = set()
        self._close_after_reply: set[Any] = set()
        self._closing_idle = False
        self.num_evicted = 0
        self._reported = 0
        self._last_report: float | None = None

    @property
    def num_open(self) -> int:
        return len(self._waiting) + len(self._busy)

    @property
    def num_busy(self) -> int:
        """Connections with a request being served (reading a body counts: it is a request in flight)."""
        return len(self._busy) + sum(1 for state in self._waiting.values() if state is Waiting.BODY)

    def opened(self, sock: Any) -> None:
        """A connection was accepted: make room for it first, then it waits for its request."""
        while self.num_open >= self.limit and self._waiting:
            self._close(next(iter(self._waiting)))
            self.num_evicted += 1
            self._report_evictions()
        self.idle(sock)

    def closed(self, sock: Any) -> None:
        self._waiting.pop(sock, None)
        self._busy.discard(sock)
        self._close_after_reply.discard(sock)

    def busy(self, sock: Any) -> None:
        """A request arrived: it is served; nothing closes the connection meanwhile."""
        self._waiting.pop(sock, None)
        self._busy.add(sock)

    def idle(self, sock: Any) -> None:
        """The connection waits for its next request (closed at once while the worker stops, or after a reply
        that said the request could not be read whole)."""
        self._busy.discard(sock)
        self._waiting.pop(sock, None)
        if self._closing_idle or sock in self._close_after_reply:
            self._close_after_reply.discard(sock)
            _shut(sock)
            return
        self._waiting[sock] = Waiting.IDLE

    def close_after_reply(self, sock: Any) -> None:
        """The request's body was not read whole: what follows on the connection cannot be trusted to start a
        request (gunicorn ignores a `Connection: close` from the app)."""
        self._close_after_reply.add(sock)

    @contextmanager
    def body_wait(self, sock: Any) -> Iterator[None]:
        self._busy.discard(sock)
        self._waiting[sock] = Waiting.BODY
        try:
            yield
        finally:
            if self._waiting.pop(sock, None) is not None:
                self._busy.add(sock)

    def close_idle(self) -> None:
        """The worker stops: close every idle connection now, and each one that becomes idle from now on."""
        self._closing_idle = True
        for sock in [s for s, state in self._waiting.items() if state is Waiting.IDLE]:
            self._close(sock)

    def close_waiting(self) -> None:
        """The grace period is over: close every connection still waiting on its client (a body not yet in)."""
        for sock in list(self._waiting):
            self._close(sock)

    def _report_evictions(self) -> None:
        """One warning per EVICTION_LOG_INTERVAL_S at most: a flood of idle connections must not flood the log."""
        now = time.monotonic()
        if self._last_report is None or now - self._last_report >= EVICTION_LOG_INTERVAL_S:
            logger.warning(
                "WORKER_CONNECTIONS reached: closed the connections that waited longest on their clients",
                extra={"worker_connections": self.limit, "num_closed": self.num_evicted - self._reported},
            )
            self._last_report, self._reported = now, self.num_evicted

    def _close(self, sock: Any) -> None:
        self._waiting.pop(sock, None)
        _shut(sock)


def _shut(sock: Any) -> None:
    """Shut the connection down; the greenlet reading from it sees the end of the stream and finishes."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # already closed by the client
        pass


def close_after_reply(environ: Mapping[str, Any]) -> None:
    """Close this request's connection once its reply is out (no-op outside the gunicorn worker)."""
    table: ConnectionTable | None = environ.get(ENVIRON_KEY)
    sock = environ.get("gunicorn.socket")
    if table is not None and sock is not None:
        table.close_after_reply(sock)


@contextmanager
def waiting_for_body(environ: Mapping[str, Any]) -> Iterator[None]:
    """Mark this request's connection as waiting on its client while the block reads the body (no-op outside
    the gunicorn worker, e.g. a Flask test client)."""
    table: ConnectionTable | None = environ.get(ENVIRON_KEY)
    sock = environ.get("gunicorn.socket")
    if table is None or sock is None:
        yield
        return
    with table.body_wait(sock):
        yield
