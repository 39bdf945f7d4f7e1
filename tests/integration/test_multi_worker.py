"""WEB_CONCURRENCY=2: two gunicorn workers in front of one engine process.

Both workers serve generations, `/metrics` gives the same totals whichever worker answers the scrape, and the
benchmark's per-role CPU accounting (bench/server_cpu.py) finds the engine and both workers, and
MAX_CONCURRENT_REQUESTS holds for the two together.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest

from bench.server_cpu import cpu_seconds_by_role, cpu_spent, role_of
from tests.live import LiveServer, start_server

MAX_TOKENS = 3


@pytest.fixture(scope="module")
def two_workers():
    server = start_server({"WEB_CONCURRENCY": "2", "LOG_LEVEL": "INFO"})
    yield server
    server.stop()


def _post(server: LiveServer, path: str, body: dict) -> tuple[int, dict]:
    """One request on its own connection (so the kernel may hand it to either worker)."""
    request = urllib.request.Request(server.url + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _chat(server: LiveServer, index: int) -> tuple[int, dict]:
    body = {"messages": [{"role": "user", "content": f"request {index}"}], "max_tokens": MAX_TOKENS, "ignore_eos": True}
    return _post(server, "/v1/chat/completions", body)


def _worker_pids(server: LiveServer) -> set[int]:
    root = psutil.Process(server.process.pid)
    return {proc.pid for proc in root.children(recursive=True) if role_of(proc) == "http"}


def _access_pids(server: LiveServer, at_least: int = 0, timeout_s: float = 10.0) -> list[int]:
    """The worker pid of every request's access log line, once there are `at_least` of them and no more come.

    A worker writes the line (after its metrics) when the reply is closed, a moment after the client has it.
    """
    deadline = time.monotonic() + timeout_s
    previous: list[int] | None = None
    while True:
        pids = [json.loads(line)["pid"] for line in server.logs().splitlines() if '"serve.access"' in line]
        if (len(pids) >= at_least and pids == previous) or time.monotonic() > deadline:
            return pids
        previous = pids
        time.sleep(0.2)


def _scrape(server: LiveServer) -> str:
    with urllib.request.urlopen(server.url + "/metrics", timeout=10) as reply:
        return reply.read().decode()


def _value(text: str, series: str) -> float:
    match = re.search(rf"^{re.escape(series)} (\S+)$", text, re.MULTILINE)
    assert match, f"{series} missing from /metrics:\n{text}"
    return float(match.group(1))


def test_both_workers_serve_from_one_engine(two_workers):
    workers = _worker_pids(two_workers)
    roles = [
        role_of(p)
        for p in [
            psutil.Process(two_workers.process.pid),
            *psutil.Process(two_workers.process.pid).children(recursive=True),
        ]
    ]
    assert roles.count("engine") == 1 and roles.count("http") == 2 and len(workers) == 2
    before = cpu_seconds_by_role(two_workers.process.pid)
    sent = 0
    with ThreadPoolExecutor(max_workers=8) as pool:
        # Which worker accepts a connection is the kernel's choice: send until both have answered (bounded).
        while set(_access_pids(two_workers, at_least=sent)) != workers and sent < 96:
            replies = list(pool.map(lambda i: _chat(two_workers, i), range(sent, sent + 16)))
            sent += 16
            assert all(status == 200 for status, _ in replies), replies
            assert all(body["usage"]["completion_tokens"] == MAX_TOKENS for _, body in replies)
    assert set(_access_pids(two_workers, at_least=sent)) == workers
    spent = cpu_spent(before, cpu_seconds_by_role(two_workers.process.pid))
    assert spent["engine"] > 0 and spent["http"] > 0


def test_metrics_are_the_same_from_either_worker(two_workers):
    earlier = len(_access_pids(two_workers))
    with ThreadPoolExecutor(max_workers=8) as pool:
        replies = list(pool.map(lambda i: _chat(two_workers, i), range(16)))
    assert all(status == 200 for status, _ in replies)
    status, error = _post(two_workers, "/generate", {"inputs": ""})
    assert status == 422 and error["error_type"] == "validation"
    pids = _access_pids(two_workers, at_least=earlier + 17)
    generations = len(pids)  # every request this server had was a generation; one failed
    assert len(set(pids)) == 2, "both workers have served (the test above makes sure of it)"
    scrapes = [_scrape(two_workers) for _ in range(12)]  # separate connections: either worker may answer
    for text in scrapes:
        assert "# TYPE tgi_request_count counter" in text
        assert _value(text, "tgi_request_count") == generations
        assert _value(text, "tgi_request_success") == generations - 1
        assert _value(text, 'tgi_request_failure{err="validation"}') == 1
        assert _value(text, 'tgi_request_failure{err="overloaded"}') == 0
        assert _value(text, "tgi_request_generated_tokens_count") == generations - 1
        assert _value(text, "tgi_request_generated_tokens_sum") == (generations - 1) * MAX_TOKENS
        assert _value(text, "tgi_request_in_flight") == 0
    # Engine gauges come from heartbeats (every 0.5 s): after two of them every worker reports the idle engine.
    time.sleep(1.2)
    for text in [_scrape(two_workers) for _ in range(6)]:
        assert _value(text, "tgi_batch_current_size") == 0 and _value(text, "tgi_queue_size") == 0


@pytest.fixture(scope="module")
def two_workers_four_requests():
    server = start_server({"WEB_CONCURRENCY": "2", "MAX_CONCURRENT_REQUESTS": "4", "LOG_LEVEL": "INFO"})
    yield server
    server.stop()


def _open_stream(server: LiveServer) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    """A streamed chat on its own connection, as long as the context allows; the caller reads at its leisure."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    body = {"messages": [{"role": "user", "content": "hold"}], "stream": True, "max_tokens": 1900, "ignore_eos": True}
    connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    return connection, connection.getresponse()


def _hold_streams(server: LiveServer, count: int) -> list[tuple[http.client.HTTPConnection, http.client.HTTPResponse]]:
    streams = [_open_stream(server) for _ in range(count)]
    for _, reply in streams:
        assert reply.status == 200, reply.read()
        assert reply.readline().startswith(b"data: ")  # admitted and generating
    return streams


def _wait_idle(server: LiveServer, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while _value(_scrape(server), "tgi_request_in_flight") != 0:
        assert time.monotonic() < deadline, "aborted streams still count as in flight"
        time.sleep(0.1)


def test_the_concurrency_limit_is_for_the_whole_server(two_workers_four_requests):
    """MAX_CONCURRENT_REQUESTS=4 over two workers: four streams are admitted wherever the kernel sends them (a
    per-worker share of 2 refused some), a fifth is 429 whichever worker takes it, and closed streams free their
    places."""
    server = two_workers_four_requests
    with urllib.request.urlopen(server.url + "/info", timeout=10) as reply:
        info = json.loads(reply.read())
    assert (info["validation_workers"], info["max_concurrent_requests"]) == (2, 4)  # as the launcher passed them on
    for attempt in range(3):  # the kernel picks the workers anew each time
        streams = _hold_streams(server, 4)
        for _ in range(2):
            status, error = _post(
                server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "one more"}], "max_tokens": 1}
            )
            assert status == 429, (attempt, status, error)
            assert error["error"]["type"] == "rate_limit_error" and error["error"]["code"] == "overloaded"
        for connection, _ in streams:
            connection.close()
        _wait_idle(server)


def test_killed_workers_give_back_their_places_and_their_batch(two_workers_four_requests):
    """Both workers SIGKILLed while holding all four places (as gunicorn kills a stuck worker): gunicorn starts new
    ones, the master's hook frees the dead workers' places (else every request would be 429 from then on), and
    the engine drops their generations (else they would run on beside the new ones)."""
    server = two_workers_four_requests
    streams = _hold_streams(server, 4)
    dead = _worker_pids(server)
    for pid in dead:
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while len(_worker_pids(server) - dead) < 2:
        assert time.monotonic() < deadline, "gunicorn did not replace the killed workers"
        time.sleep(0.2)
    for connection, _ in streams:
        connection.close()
    deadline = time.monotonic() + 30
    while True:  # a new worker answers 503 until it has the engine's first heartbeat
        streams = [_open_stream(server) for _ in range(4)]
        if all(reply.status == 200 for _, reply in streams):
            break
        assert all(reply.status in (200, 503) for _, reply in streams), [reply.status for _, reply in streams]
        assert time.monotonic() < deadline, "the new workers never became ready"
        for connection, _ in streams:
            connection.close()
        _wait_idle(server)
        time.sleep(0.5)
    for _, reply in streams:
        assert reply.readline().startswith(b"data: ")
    sizes = []
    for _ in range(15):  # the engine's batch over three heartbeats: only the new streams generate
        sizes.append(_value(_scrape(server), "tgi_batch_current_size"))
        time.sleep(0.1)
    assert max(sizes) == 4, sizes
    for connection, _ in streams:
        connection.close()
    _wait_idle(server)
