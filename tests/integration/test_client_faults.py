"""Clients that misbehave against the real server (launcher, gunicorn + gevent, engine process) on loopback: they
leave before the reply, cut their bodies short, never send them, hold a thousand idle connections or send a
megabyte to tokenize. None of it may cost the engine work for nobody or stall anyone else."""

from __future__ import annotations

import http.client
import json
import re
import resource
import socket
import statistics
import struct
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.live import LiveServer, start_server

NUM_LEAVING = 12
READ_TIMEOUT_S = 2
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def server():
    server = start_server(
        {"REQUEST_READ_TIMEOUT": str(READ_TIMEOUT_S), "MAX_CONCURRENT_REQUESTS": str(NUM_LEAVING), "LOG_LEVEL": "INFO"}
    )
    yield server
    server.stop()


def _request_bytes(path: str, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: test", "Content-Type: application/json"]
    lines += [f"{k}: {v}" for k, v in {"Content-Length": str(len(body)), **(headers or {})}.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def _connect(server: LiveServer, data: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    if data:
        sock.sendall(data)
    return sock


def _read_all(sock: socket.socket, timeout_s: float = 30) -> bytes:
    """Everything until the server closes the connection."""
    sock.settimeout(timeout_s)
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def _scrape(server: LiveServer) -> str:
    with urllib.request.urlopen(server.url + "/metrics", timeout=10) as reply:
        return reply.read().decode()


def _value(text: str, series: str) -> float:
    match = re.search(rf"^{re.escape(series)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def _num_kv_blocks(server: LiveServer) -> int:
    with urllib.request.urlopen(server.url + "/info", timeout=10) as reply:
        return json.loads(reply.read())["engine"]["kv_cache_blocks"]


def _wait_for(condition, timeout_s: float, what: str) -> float:
    """Poll until `condition()` holds; returns the seconds it took."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout_s, what
        time.sleep(0.1)
    return time.monotonic() - start


def _access_records(server: LiveServer) -> list[dict]:
    return [json.loads(line) for line in server.logs().splitlines() if '"serve.access"' in line]


def _chat(server: LiveServer, max_tokens: int, timeout_s: float = 120) -> tuple[int, dict]:
    body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": max_tokens, "ignore_eos": True}
    request = urllib.request.Request(server.url + CHAT, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_non_streaming_clients_that_leave_stop_their_generation(server):
    """Clients of whole-reply requests give up (a timeout, then close or reset): their engine requests stop within
    a step instead of running to max_tokens, their KV blocks and admission places come back, and the log says they
    were abandoned."""
    num_blocks = _num_kv_blocks(server)
    earlier = len(_access_records(server))
    gone_before = _value(_scrape(server), 'tgi_request_failure{err="client_gone"}')
    body = json.dumps({"messages": [{"role": "user", "content": "stay"}], "max_tokens": 1900, "ignore_eos": True})
    clients = [_connect(server, _request_bytes(CHAT, body.encode())) for _ in range(NUM_LEAVING)]
    _wait_for(lambda: _value(_scrape(server), "tgi_batch_current_size") == NUM_LEAVING, 60, "not all generating")
    status, error = _chat(server, 1)
    assert status == 429, "every admission place is taken while they generate"
    for index, sock in enumerate(clients):
        if index % 2:  # a reset instead of an orderly close
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()

    def released() -> bool:
        text = _scrape(server)
        return (
            _value(text, "tgi_batch_current_size") == 0
            and _value(text, "tgi_request_in_flight") == 0
            and _value(text, "tgi_kv_cache_free_blocks") == num_blocks
        )

    # Generating on to max_tokens would take minutes here; the heartbeats that report it come every 0.5 s.
    _wait_for(released, 15, "the engine kept generating for clients that left")
    with ThreadPoolExecutor(max_workers=NUM_LEAVING) as pool:  # every admission place is free again
        replies = list(pool.map(lambda _: _chat(server, 2), range(NUM_LEAVING)))
    assert [status for status, _ in replies] == [200] * NUM_LEAVING
    records = _access_records(server)[earlier:]
    abandoned = [r for r in records if r["status"] == 499]
    assert len(abandoned) == NUM_LEAVING
    for record in abandoned:
        assert record["finish_reason"] == "abandoned" and record["error_kind"] == "client_gone"
        assert record["completion_tokens"] < 1900
    assert _value(_scrape(server), 'tgi_request_failure{err="client_gone"}') - gone_before == NUM_LEAVING


def _status_and_body(raw: bytes) -> tuple[int, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_a_body_shorter_than_its_content_length_is_a_400_not_a_generation(server):
    """A complete JSON body under a Content-Length it never meets (the client then half-closes), and a chunked
    body cut off, get a 400 and the connection closed; nothing is generated."""
    earlier = len(_access_records(server))
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}).encode()
    sock = _connect(server, _request_bytes(CHAT, body, {"Content-Length": str(len(body) + 40)}))
    sock.shutdown(socket.SHUT_WR)
    status, error = _status_and_body(_read_all(sock))
    assert status == 400 and error["error"]["code"] == "incomplete_body", error
    assert f"says {len(body) + 40} bytes" in error["error"]["message"]

    chunk = b'{"inputs": "hello", "parameters": {"max_new_tokens": 5}}'
    head = _request_bytes("/generate", b"", {"Transfer-Encoding": "chunked"}).replace(b"Content-Length: 0\r\n", b"")
    sock = _connect(server, head + f"{len(chunk) + 10:x}\r\n".encode() + chunk)
    sock.shutdown(socket.SHUT_WR)
    status, error = _status_and_body(_read_all(sock))
    assert status == 400 and error["error_type"] == "validation", error

    sock = _connect(server, _request_bytes(CHAT, body, {"Content-Length": str(len(body) + 40)}))
    sock.close()  # gone for good: the 400 reaches no one, but the log has it
    _wait_for(lambda: len(_access_records(server)) >= earlier + 3, 10, "no log line for the cut body")
    records = _access_records(server)[earlier:]
    assert [r["status"] for r in records] == [400, 400, 400]
    assert all(r["error_kind"] == "incomplete_body" and "prompt_tokens" not in r for r in records), [
        (r.get("error_kind"), r.get("error")) for r in records
    ]


def test_a_body_that_never_arrives_gets_a_408_and_the_connection_closes(server):
    sock = _connect(server, _request_bytes(CHAT, b"", {"Content-Length": "100"}))
    started = time.monotonic()
    status, error = _status_and_body(_read_all(sock))
    assert status == 408 and error["error"]["code"] == "request_timeout"
    assert "REQUEST_READ_TIMEOUT" in error["error"]["message"]
    assert READ_TIMEOUT_S * 0.9 <= time.monotonic() - started < READ_TIMEOUT_S + 20


def _ping_statuses(server: LiveServer, count: int) -> list[int | str]:
    """`count` fresh /ping connections with SageMaker's 2 s timeout."""
    statuses: list[int | str] = []
    for _ in range(count):
        try:
            with urllib.request.urlopen(server.url + "/ping", timeout=2) as reply:
                statuses.append(reply.status)
        except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
            statuses.append(type(exc).__name__)
        time.sleep(0.1)
    return statuses


def test_a_thousand_idle_connections_leave_ping_and_generation_answering(server):
    """1,000 connections that send headers and never their body, or nothing at all, or half a request line: fresh
    /ping calls answer within SageMaker's 2 s, a generation completes, and the server closes every idle
    connection within its time limits."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1200:
        if hard != resource.RLIM_INFINITY and hard < 1200:
            # Justified skip: a machine whose hard limit is below what the test opens cannot run it at all.
            pytest.skip(f"this test needs 1,200 open files; the limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (1200, hard))
    kinds = [
        _request_bytes(CHAT, b"", {"Content-Length": "100"}),  # headers, no body
        b"",  # nothing
        b"POST /v1/chat/completions HT",  # half a request line
    ]
    idle = [_connect(server, kinds[i % 3]) for i in range(1000)]
    try:
        time.sleep(0.5)
        assert _ping_statuses(server, 10) == [200] * 10
        status, reply = _chat(server, 3, timeout_s=30)
        assert status == 200 and reply["usage"]["completion_tokens"] == 3
        deadline = time.monotonic() + 2 * READ_TIMEOUT_S + 30
        ends = []
        for sock in idle:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                ends.append(_read_all(sock)[:12])
            except ConnectionResetError:
                ends.append(b"reset")
        # Closed by the server: a 408 where the headers came, the bare end of the connection otherwise.
        assert all(end in (b"", b"reset", b"HTTP/1.1 408") for end in ends), set(ends)
        assert ends[0::3].count(b"HTTP/1.1 408") >= 300  # a few of these may have been closed to make room
    finally:
        for sock in idle:
            sock.close()


def _stream_gaps(server: LiveServer, gaps: list[tuple[float, float]], started: threading.Event) -> None:
    """A long chat stream; (arrival time, gap since the previous event) for each event."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 400, "ignore_eos": True, "stream": True}
    connection.request("POST", CHAT, json.dumps(body), {"Content-Type": "application/json"})
    last = None
    for line in connection.getresponse():
        if not line.startswith(b"data: "):
            continue
        now = time.monotonic()
        if last is not None:
            gaps.append((now, now - last))
        last = now
        if len(gaps) == 20:
            started.set()
    connection.close()


@pytest.mark.parametrize("route", ["/tokenize", "/chat_tokenize"])
def test_a_megabyte_to_tokenize_is_refused_without_stalling_a_stream(server, route):
    """1.5 MB of text to tokenize (a 35 MB reply once, and seconds of every stream's time): now the prompt limit
    refuses it, the text is encoded off the worker's hub, and a concurrent stream keeps its pace."""
    gaps: list[tuple[float, float]] = []
    started = threading.Event()
    streamer = threading.Thread(target=_stream_gaps, args=(server, gaps, started))
    streamer.start()
    assert started.wait(120), "the stream never got going"
    usual = statistics.median(gap for _, gap in gaps)
    text = "héllo wörld, tokenizers " * 45_000
    body = {"inputs": text} if route == "/tokenize" else {"messages": [{"role": "user", "content": text}]}
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    sent = time.monotonic()
    connection.request("POST", route, json.dumps(body), {"Content-Type": "application/json"})
    reply = connection.getresponse()
    error = json.loads(reply.read())
    answered = time.monotonic()
    streamer.join(timeout=300)
    assert reply.status == 422 and error["error_type"] == "validation"
    assert "`inputs` must have less than" in error["error"]
    during = [gap for at, gap in gaps if at >= sent and at - gap <= answered]  # the gaps that overlap the call
    # Before, the stream got no event for as long as the tokenize took (seconds); a stall now would show as one
    # gap far beyond the stream's usual pace.
    assert during and max(during) < max(2.0, 10 * usual), (max(during), usual, answered - sent)


def test_a_worker_full_of_waiting_connections_closes_the_oldest_to_answer_ping():
    """WORKER_CONNECTIONS=40 and connections that never send a thing (no timeout would close them for a minute):
    each new connection past 40 closes the one that has waited longest, so /ping is answered at once; a stream
    being served is never closed and finishes whole."""
    server = start_server({"WORKER_CONNECTIONS": "40", "REQUEST_READ_TIMEOUT": "60"})
    try:
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 60, "ignore_eos": True, "stream": True}
        connection.request("POST", CHAT, json.dumps(body), {"Content-Type": "application/json"})
        stream = connection.getresponse()
        assert stream.readline().startswith(b"data: ")
        idle = []
        for _ in range(100):
            idle.append(_connect(server))
            time.sleep(0.01)  # one at a time, so the order the worker sees them in is the order here
        assert _ping_statuses(server, 5) == [200] * 5
        closed = []
        for sock in idle:
            sock.settimeout(0.5)
            try:
                closed.append(sock.recv(1) == b"")
            except TimeoutError:
                closed.append(False)
        num_closed = closed.count(True)
        assert 55 <= num_closed <= 100 and closed == [True] * num_closed + [False] * (100 - num_closed), closed
        text = stream.read().decode()
        assert text.endswith("data: [DONE]\n\n") and '"finish_reason":"length"' in text
        for sock in idle:
            sock.close()
    finally:
        server.stop()


def _greedy_stream(server: LiveServer, question: str) -> tuple[str, str | None]:
    body = {"messages": [{"role": "user", "content": question}], "max_tokens": 24, "temperature": 0, "stream": True}
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=180)
    connection.request("POST", CHAT, json.dumps(body), {"Content-Type": "application/json"})
    text, finish = [], None
    for line in connection.getresponse():
        line = line.decode().strip()
        if line.startswith("data: {"):
            choice = json.loads(line[len("data: ") :])["choices"][0]
            text.append(choice["delta"].get("content") or "")
            finish = choice["finish_reason"] or finish
    connection.close()
    return "".join(text), finish


def _stream_then_leave(server: LiveServer, reset: bool) -> None:
    body = {"messages": [{"role": "user", "content": "go"}], "max_tokens": 1900, "ignore_eos": True, "stream": True}
    sock = _connect(server, _request_bytes(CHAT, json.dumps(body).encode()))
    received = b""
    while received.count(b"data: ") < 3:
        received += sock.recv(65536)
    if reset:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _wait_then_leave(server: LiveServer, reset: bool) -> None:
    body = {"messages": [{"role": "user", "content": "wait"}], "max_tokens": 1900, "ignore_eos": True}
    sock = _connect(server, _request_bytes(CHAT, json.dumps(body).encode()))
    time.sleep(2.0)  # long enough to be read and admitted (a reset before that would discard the request unread)
    if reset:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _cut_body(server: LiveServer) -> int:
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}).encode()
    sock = _connect(server, _request_bytes(CHAT, body, {"Content-Length": str(len(body) + 40)}))
    sock.shutdown(socket.SHUT_WR)
    status, _ = _status_and_body(_read_all(sock))
    sock.close()
    return status


def _tokenize_bomb(server: LiveServer) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    connection.request(
        "POST", "/tokenize", json.dumps({"inputs": "bomb " * 300_000}), {"Content-Type": "application/json"}
    )
    status = connection.getresponse().status
    connection.close()
    return status


def test_staying_streams_lose_nothing_while_every_fault_happens_at_once():
    """Greedy streams that stay get exactly their solo text while, at the same time, clients of streams and of
    whole replies leave (closed or reset), 300 connections idle, bodies arrive cut short and megabytes arrive to
    tokenize; /ping answers throughout; afterwards nothing runs, every KV block is free, no request is counted in
    flight, and no request got a 5xx."""
    server = start_server({"REQUEST_READ_TIMEOUT": str(READ_TIMEOUT_S), "LOG_LEVEL": "INFO"})
    try:
        questions = [f"Question {i}: what does the keyword {w} do?" for i, w in enumerate("def for try with".split())]
        questions += [f"Tell me about {w} in {n} words" for n, w in enumerate(["lists", "dicts", "sets", "tuples"])]
        solo = [_greedy_stream(server, q) for q in questions]
        num_blocks = _num_kv_blocks(server)
        pings: list[int | str] = []
        stop_pinging = threading.Event()

        def ping_throughout() -> None:
            while not stop_pinging.is_set():
                pings.extend(_ping_statuses(server, 1))

        pinger = threading.Thread(target=ping_throughout)
        pinger.start()
        idle = [
            _connect(server, _request_bytes(CHAT, b"", {"Content-Length": "100"}) if i % 2 else b"") for i in range(300)
        ]
        with ThreadPoolExecutor(max_workers=40) as pool:
            staying = [pool.submit(_greedy_stream, server, q) for q in questions]
            faults = [pool.submit(_stream_then_leave, server, i % 2 == 0) for i in range(8)]
            faults += [pool.submit(_wait_then_leave, server, i % 2 == 0) for i in range(8)]
            cut = [pool.submit(_cut_body, server) for _ in range(4)]
            bombs = [pool.submit(_tokenize_bomb, server) for _ in range(2)]
            together = [future.result(timeout=300) for future in staying]
            for future in faults:
                future.result(timeout=60)
            assert [future.result(timeout=60) for future in cut] == [400] * 4
            assert [future.result(timeout=120) for future in bombs] == [422] * 2
        stop_pinging.set()
        pinger.join(timeout=30)
        for sock in idle:
            sock.close()
        assert together == solo and all(finish == "length" for _, finish in together)
        assert pings and set(pings) == {200}, pings

        def released() -> bool:
            text = _scrape(server)
            return (
                _value(text, "tgi_batch_current_size") == 0
                and _value(text, "tgi_request_in_flight") == 0
                and _value(text, "tgi_kv_cache_free_blocks") == num_blocks
            )

        _wait_for(released, 15, "work or KV blocks left behind")
        statuses = [record["status"] for record in _access_records(server)]
        assert not [status for status in statuses if status >= 500], statuses
        assert statuses.count(499) == 8  # the whole-reply clients that left; streams that left show their 200
    finally:
        server.stop()
