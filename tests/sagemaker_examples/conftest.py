"""One real server (launcher, gunicorn + gevent, engine process, tiny model) on loopback for the example tests.

The examples' AWS clients get dummy credentials and a region, and never look for EC2 instance credentials.
"""

from __future__ import annotations

import gc

import pytest

from tests.live import LiveServer, start_server


@pytest.fixture(autouse=True)
def offline_aws(monkeypatch):
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("SAGEMAKER_SUPPRESS_V2_WARNING", "1")
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="package")
def live_server() -> LiveServer:
    server = start_server()
    yield server
    # Clients the tests dropped may still hold keep-alive connections, which delay a graceful stop.
    gc.collect()
    server.stop()
