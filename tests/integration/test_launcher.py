"""container/serve as SageMaker runs it: configuration errors, SIGTERM drains, /ping and the logs under load."""

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
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert result.returncode != 0
    assert name in result.stderr + result.stdout


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_finishes_in_flight_requests_then_exits_zero(workers):
    """SageMaker stops a container with SIGTERM: requests in flight (on every worker: two is the GPU default)
    finish whole within the grace period, then the server exits 0 (tests/integration/test_shutdown.py has the
    requests that outlive it)."""
    server = start_server({"WEB_CONCURRENCY": str(workers), "SHUTDOWN_GRACE_PERIOD": "150"})
    body = json.dumps(
        {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 100, "ignore_eos": True}
    ).encode()
    results: list[dict] = []

    def call() -> None:
        request = urllib.request.Request(
            f"{server.url}/v1/chat/completions", body, {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=170) as reply:
            results.append({"status": reply.status, "body": json.loads(reply.read())})

    callers = [threading.Thread(target=call) for _ in range(2 * workers)]
    for caller in callers:
        caller.start()
    time.sleep(0.5)
    assert not results, "the requests must still be in flight when SIGTERM comes"
    server.process.send_signal(signal.SIGTERM)
    for caller in callers:
        caller.join(timeout=170)
    assert server.process.wait(timeout=180) == 0
    assert len(results) == 2 * workers
    assert all(r["status"] == 200 and r["body"]["usage"]["completion_tokens"] == 100 for r in results)


def test_busy_server_answers_ping_takes_sagemaker_headers_and_logs_json_lines():
    """SageMaker's contract on a real launcher: /ping within 2 s while a long generation runs, its request
    headers accepted, every stdout line one JSON object (CloudWatch filters on level and request id)."""
    server = start_server({"SAGEMAKER_CONTAINER_LOG_LEVEL": "20"})
    try:
        long_body = json.dumps(
            {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 400, "ignore_eos": True, "stream": True}
        ).encode()
        finished = threading.Event()

        def generate() -> None:
            request = urllib.request.Request(
                f"{server.url}/v1/chat/completions", long_body, {"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(request, timeout=170) as reply:
                reply.read()
            finished.set()

        worker = threading.Thread(target=generate)
        worker.start()
        time.sleep(0.3)  # the generation is under way
        pings = []
        for _ in range(5):
            with urllib.request.urlopen(f"{server.url}/ping", timeout=2) as reply:
                pings.append(reply.status)
        assert pings == [200] * 5 and not finished.is_set()

        headers = {
            "Content-Type": "application/json",
            "X-Amzn-SageMaker-Custom-Attributes": "trace=1",
            "X-Amzn-SageMaker-Target-Model": "model.tar.gz",
            "X-Amzn-SageMaker-Inference-Id": "inference-42",
            "X-Some-Unknown-Header": "ignored",
        }
        body = json.dumps({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}).encode()
        request = urllib.request.Request(f"{server.url}/invocations", body, headers)
        with urllib.request.urlopen(request, timeout=60) as reply:
            assert reply.status == 200
            request_id = reply.headers["X-Request-Id"]
            assert json.loads(reply.read())["usage"]["completion_tokens"] == 4
        worker.join(timeout=120)
        assert finished.is_set()
    finally:
        assert server.stop() == 0

    records = [json.loads(line) for line in server.logs().splitlines() if line.strip()]
    assert all({"level", "message", "time"} <= record.keys() for record in records)
    access = [r for r in records if r.get("request_id") == request_id]
    assert len(access) == 1 and access[0]["route"] == "/invocations" and access[0]["status"] == 200
    assert access[0]["completion_tokens"] == 4 and access[0]["total_ms"] >= access[0]["ttft_ms"] > 0
