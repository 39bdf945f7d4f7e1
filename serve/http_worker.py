"""The gunicorn worker class: gunicorn's gevent worker, plus the connection table and the order of a stop.

On SIGTERM (from the gunicorn master, which the launcher stops): gunicorn stops accepting; idle connections are
closed at once; requests in flight run on for SHUTDOWN_GRACE_PERIOD; then each one left is ended with an error
(an error event in a stream, a 503 otherwise) and the worker exits once their replies are out.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import gevent
from gunicorn.workers.ggevent import GeventWorker

from serve.connections import ENVIRON_KEY, SPARE_CONNECTIONS, ConnectionTable

logger = logging.getLogger("serve.http_worker")


class ServeWorker(GeventWorker):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.connections = ConnectionTable(self.cfg.worker_connections)
        self.worker_connections = self.cfg.worker_connections + SPARE_CONNECTIONS  # the size of gunicorn's pool
        self.flask_app = None

    def load_wsgi(self) -> None:
        super().load_wsgi()
        app = self.flask_app = self.wsgi
        connections = self.connections

        def wsgi(environ: dict, start_response: Any) -> Any:
            environ[ENVIRON_KEY] = connections
            return app(environ, start_response)

        self.wsgi = wsgi

    def handle(self, listener: Any, client: Any, addr: Any) -> None:
        self.connections.opened(client)
        try:
            super().handle(listener, client, addr)
        finally:
            self.connections.closed(client)

    def handle_request(self, listener_name: Any, req: Any, sock: Any, addr: Any) -> Any:
        self.connections.busy(sock)
        try:
            return super().handle_request(listener_name, req, sock, addr)
        finally:
            self.connections.idle(sock)

    def handle_exit(self, sig: int, frame: Any) -> None:
        super().handle_exit(sig, frame)  # gunicorn stops accepting and waits for the handlers to finish
        gevent.spawn(self._stop_serving)

    def _stop_serving(self) -> None:
        from serve.app import serve_state  # after the fork, with the app loaded

        state = serve_state(self.flask_app)
        grace_s = state.settings.shutdown_grace_s
        state.begin_drain()
        self.connections.close_idle()
        logger.info(
            "stopping: finishing requests in flight",
            extra={"in_flight": self.connections.num_busy, "grace_period_s": grace_s},
        )
        deadline = time.monotonic() + grace_s
        while self.connections.num_busy and time.monotonic() < deadline:
            gevent.sleep(0.1)
        if self.connections.num_busy:
            logger.warning(
                "grace period over: ending the requests still in flight with an error",
                extra={"in_flight": self.connections.num_busy, "grace_period_s": grace_s},
            )
            state.end_in_flight()
            self.connections.close_waiting()
