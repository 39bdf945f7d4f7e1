"""SSE framing and the body wrapper that always runs its cleanup."""

from __future__ import annotations

from flask import Flask

from serve.streaming import SSE_DONE, ClosingStream, sse_data, sse_response


def test_frames_are_data_space_compact_json_blank_line():
    assert sse_data({"a": 1, "t": "é"}) == 'data: {"a":1,"t":"é"}\n\n'.encode()
    assert SSE_DONE == b"data: [DONE]\n\n"


def test_cleanup_runs_once_even_if_the_body_was_never_iterated():
    calls = []

    def chunks():
        try:
            yield b"x"
        finally:
            calls.append("generator")

    body = ClosingStream(chunks(), lambda: calls.append("on_close"))
    body.close()
    body.close()
    assert calls == ["on_close"]  # a never-started generator has no finally to run


def test_cleanup_runs_after_a_partial_read():
    calls = []

    def chunks():
        try:
            yield b"a"
            yield b"b"
        finally:
            calls.append("generator")

    body = ClosingStream(chunks(), lambda: calls.append("on_close"))
    assert next(iter(body)) == b"a"
    body.close()
    assert calls == ["generator", "on_close"]


def test_sse_response_headers_and_close_through_werkzeug():
    calls = []
    app = Flask(__name__)

    @app.get("/s")
    def stream():
        return sse_response(iter([sse_data({"i": 1}), SSE_DONE]), lambda: calls.append("closed"))

    with app.test_client() as client:
        reply = client.get("/s", buffered=False)
        assert reply.headers["Content-Type"] == "text/event-stream"
        assert reply.headers["X-Accel-Buffering"] == "no"
        assert b"".join(reply.response) == b'data: {"i":1}\n\ndata: [DONE]\n\n'
        reply.close()
    assert calls == ["closed"]
