"""One real server (launcher, gunicorn + gevent, engine process, tiny model) on loopback for the module."""

from __future__ import annotations

import pytest

from tests.live import LiveServer, start_server


@pytest.fixture(scope="package")
def live_server() -> LiveServer:
    server = start_server()
    yield server
    server.stop()
