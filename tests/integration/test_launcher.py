"""container/serve as SageMaker runs it: configuration errors, SIGTERM drains, a dead child stops the rest."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from tests.live import REPO_ROOT, free_port, start_server


@pytest.mark.parametrize(
    "name, value",
    [("MAX_INPUT_TOKENS", "ten"), ("HF_MODEL_QUANTIZE", "gptq"), ("HF_MODEL_ID", "/no/such/model/folder")],
)
def test_bad_configuration_stops_startup_naming_the_variable(name, value):
    env = {**os.environ, "PORT": str(free_port()), name: value}
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "container" / "serve"), "serve"],
        env=env, capture_output=True, text=True, timeout=90,
    )
    assert result.returncode != 0
    assert name in result.stderr + result.stdout


def test_sigterm_finishes_in_flight_request_then_exits_zero():
    server = start_server()
    body = json.dumps(
        {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 60, "ignore_eos": True}
    ).encode()
    result: dict = {}

    def call() -> None:
        request = urllib.request.Request(f"{server.url}/v1/chat/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as reply:
            result["status"] = reply.status
            result["body"] = json.loads(reply.read())

    worker = threading.Thread(target=call)
    worker.start()
    time.sleep(0.5)  # the request is in flight
    server.process.send_signal(signal.SIGTERM)
    worker.join(timeout=40)
    assert server.process.wait(timeout=40) == 0
    assert result.get("status") == 200 and result["body"]["usage"]["completion_tokens"] == 60


def test_engine_death_stops_the_server_with_an_error_code():
    server = start_server()
    try:
        engine_pids = subprocess.run(
            ["pgrep", "-f", "-s", str(os.getpgid(server.process.pid)), "model_handler.server"],
            capture_output=True, text=True,
        ).stdout.split()
        assert engine_pids, "engine process not found"
        os.kill(int(engine_pids[0]), signal.SIGKILL)
        assert server.process.wait(timeout=40) != 0
    finally:
        server.stop()
