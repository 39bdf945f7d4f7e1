"""Stopping and crashing in order, on the real server: SIGTERM to the launcher (as SageMaker sends it) or to its
whole process group (Ctrl-C under `make serve`, `kill -- -PGID`), and the engine killed under load.

Requests shorter than the grace period finish whole; longer ones end with an error (an error event, and
`[DONE]` on /v1, in a stream); then the engine stops and the launcher exits with no process left.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

import psutil

from serve.launcher import EXIT_ENGINE_EXITED, EXIT_STOPPED
from tests.live import LiveServer, start_server

GRACE_S = 8


@dataclass
class Call:
    """One request on its own connection, run in a thread: its status, events or body, and when it ended."""

    path: str
    body: dict
    stream: bool
    status: int = 0
    events: list[str] = field(default_factory=list)
    reply: dict | None = None
    first_event: threading.Event = field(default_factory=threading.Event)
    ended_at: float = 0.0

    def run(self, server: LiveServer) -> threading.Thread:
        thread = threading.Thread(target=self._run, args=(server,), daemon=True)
        thread.start()
        return thread

    def _run(self, server: LiveServer) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
        try:
            connection.request("POST", self.path, json.dumps(self.body), {"Content-Type": "application/json"})
            reply = connection.getresponse()
            self.status = reply.status
            if not self.stream:
                self.reply = json.loads(reply.read())
                return
            for line in reply:
                if line.startswith(b"data: "):
                    self.events.append(line[len(b"data: ") :].decode().strip())
                    self.first_event.set()
        finally:
            self.ended_at = time.monotonic()
            self.first_event.set()
            connection.close()


def _chat(max_tokens: int, stream: bool) -> Call:
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens, "ignore_eos": True}
    return Call("/v1/chat/completions", {**body, "stream": stream}, stream)


def _generate(max_new_tokens: int, stream: bool) -> Call:
    body = {"inputs": "hi", "parameters": {"max_new_tokens": max_new_tokens}}
    return Call("/generate_stream" if stream else "/generate", body, stream)


def _process_tree(server: LiveServer) -> list[psutil.Process]:
    root = psutil.Process(server.process.pid)
    return [root, *root.children(recursive=True)]


def _assert_ended_with_an_error_event(call: Call, openai: bool) -> dict:
    assert call.status == 200 and len(call.events) >= 2, (call.status, call.events[-3:])
    if openai:
        assert call.events[-1] == "[DONE]", call.events[-3:]
        error = json.loads(call.events[-2])
        assert error["error"]["type"] == "service_unavailable_error", error
        return error
    error = json.loads(call.events[-1])
    assert error["error_type"] == "unhealthy", error
    return error


def _shutdown_scenario(server: LiveServer, send_signal) -> tuple[float, float]:
    """Short and long requests of both dialects in flight, a signal, then what each got; returns (signal time,
    launcher exit time)."""
    short = [_chat(2, stream=False), _chat(2, stream=True)]
    long = [_chat(1900, True), _generate(1900, True), _chat(1900, False), _generate(1900, False)]
    threads = [call.run(server) for call in long]
    for call in long[:2]:
        assert call.first_event.wait(60) and call.status == 200, "the long streams never started"
    time.sleep(0.5)  # the non-streaming ones are generating too
    threads += [call.run(server) for call in short]  # just accepted when the signal comes
    tree = _process_tree(server)
    signalled = time.monotonic()
    send_signal(server)
    code = server.process.wait(timeout=GRACE_S + 40)
    exited = time.monotonic()
    for thread in threads:
        thread.join(timeout=30)
    assert code == EXIT_STOPPED, server.logs()[-3000:]
    _, alive = psutil.wait_procs(tree, timeout=5)
    assert alive == [], f"left behind: {alive}"

    chat, streamed = short
    assert chat.status == 200 and chat.reply["usage"]["completion_tokens"] == 2
    assert streamed.status == 200 and streamed.events[-1] == "[DONE]"
    assert json.loads(streamed.events[-2])["choices"][0]["finish_reason"] == "length"
    assert "shutting down" in _assert_ended_with_an_error_event(long[0], openai=True)["error"]["message"]
    assert "shutting down" in _assert_ended_with_an_error_event(long[1], openai=False)["error"]
    assert long[2].status == 503 and long[2].reply["error"]["code"] == "model_not_ready"
    assert long[3].status == 503 and long[3].reply["error_type"] == "unhealthy"
    for call in long:  # cut at the end of the grace period, not before
        assert call.ended_at - signalled >= GRACE_S - 0.5, call.ended_at - signalled
    return signalled, exited


def test_sigterm_to_the_launcher_lets_requests_finish_within_the_grace_period_then_ends_the_rest():
    server = start_server({"SHUTDOWN_GRACE_PERIOD": str(GRACE_S), "LOG_LEVEL": "INFO"})
    try:
        signalled, exited = _shutdown_scenario(server, lambda s: s.process.send_signal(signal.SIGTERM))
    finally:
        server.stop()
    assert exited - signalled < GRACE_S + 20
    lines = [json.loads(line) for line in server.logs().splitlines() if line.startswith("{")]
    order = [
        next(i for i, r in enumerate(lines) if r["message"] == message)
        for message in ("stop requested", "grace period over: ending the requests still in flight with an error")
    ]
    engine_stop = next(i for i, r in enumerate(lines) if r["message"] == "engine stopping")
    assert order[0] < order[1] < engine_stop


def test_sigterm_to_the_process_group_stops_in_the_same_order_tensor_parallel_ranks_included():
    """Every process of the group is signalled at once (Ctrl-C, `kill -- -PGID`): the engine no longer stops
    first (requests just accepted got a 500, streams stalled), and its second rank goes with it."""
    server = start_server({"SHUTDOWN_GRACE_PERIOD": str(GRACE_S), "SM_NUM_GPUS": "2"})
    try:
        engine = next(p for p in _process_tree(server) if "model_handler.server" in " ".join(p.cmdline()))
        assert len(engine.children()) >= 1, "the second tensor-parallel rank should run beside the engine"
        _shutdown_scenario(server, lambda s: os.killpg(os.getpgid(s.process.pid), signal.SIGTERM))
    finally:
        server.stop()


def test_a_killed_engine_fails_requests_at_once_turns_ping_unhealthy_and_stops_the_launcher():
    """kill -9 of the engine under load: the workers learn it from the socket, not from the heartbeats' 10 s
    silence; every request gets its error at once, /ping never says healthy again, and the launcher exits with
    its own status (not the engine's signal number), leaving no process behind."""
    server = start_server()
    try:
        calls = [_chat(1900, True), _generate(1900, True), _chat(1900, False), _generate(1900, False)]
        threads = [call.run(server) for call in calls]
        for call in calls[:2]:
            assert call.first_event.wait(60) and call.status == 200
        time.sleep(0.5)
        tree = _process_tree(server)
        engine = next(p for p in tree if "model_handler.server" in " ".join(p.cmdline()))
        killed = time.monotonic()
        engine.kill()
        for thread in threads:
            thread.join(timeout=30)
        pings = []
        while server.process.poll() is None and len(pings) < 20:
            try:
                with urllib.request.urlopen(server.url + "/ping", timeout=2) as reply:
                    pings.append(reply.status)
            except urllib.error.HTTPError as error:
                pings.append(error.code)
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pings.append("refused")
            time.sleep(0.05)
        code = server.process.wait(timeout=30)
    finally:
        server.stop()
    assert code == EXIT_ENGINE_EXITED, server.logs()[-3000:]
    _, alive = psutil.wait_procs(tree, timeout=5)
    assert alive == [], f"left behind: {alive}"
    assert 200 not in pings, pings
    for call in calls:
        assert call.ended_at - killed < 5.0, "a request waited for the heartbeat timeout"
    openai_stream, tgi_stream, openai_reply, tgi_reply = calls
    assert openai_stream.events[-1] == "[DONE]"
    assert json.loads(openai_stream.events[-2])["error"]["message"] == "the engine process exited"
    assert json.loads(tgi_stream.events[-1])["error_type"] == "generation"
    assert openai_reply.status == 500 and openai_reply.reply["error"]["code"] == "generation_failed"
    assert tgi_reply.status == 424 and tgi_reply.reply["error_type"] == "generation"
