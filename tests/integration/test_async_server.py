"""The whole server with async scheduling (the default on one GPU; forced on here, on CPU) answers exactly as the
step-by-step server does: concurrent streams, stop sequences, penalties and logprobs (which drain to the
step-by-step path), and a client that leaves mid-stream."""

from __future__ import annotations

import json
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from tests.integration.test_concurrency import _stream_text
from tests.live import LiveServer, start_server

QUESTIONS = [f"Tell me about {word}, briefly." for word in ("rivers", "owls", "tea", "glass", "maps", "bells")]


@pytest.fixture(scope="module")
def async_server() -> LiveServer:
    server = start_server({"ASYNC_SCHEDULING": "1"})
    yield server
    server.stop()


def _chat(server: LiveServer, question: str, **kwargs):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="-")
    kwargs = {"temperature": 0, "max_tokens": 20, **kwargs}
    return client.chat.completions.create(
        model="tgi", messages=[{"role": "user", "content": question}], **kwargs
    ).choices[0]


def test_concurrent_streams_match_the_step_by_step_server(live_server, async_server):
    expected = [_stream_text(live_server.url, q) for q in QUESTIONS]
    with ThreadPoolExecutor(max_workers=len(QUESTIONS)) as pool:
        together = list(pool.map(lambda q: _stream_text(async_server.url, q), QUESTIONS))
    assert together == expected
    assert len({text for text, _ in expected}) > 1, "different prompts should not all give the same text"


def test_stop_sequences_penalties_and_logprobs_match(live_server, async_server):
    question = QUESTIONS[0]
    full = _chat(live_server, question).message.content
    assert len(full) > 6, "the tiny model should say something here"
    stop = full[3:6]  # a string the reply is sure to contain
    cases = [
        {"stop": [stop]},
        {"frequency_penalty": 0.8, "presence_penalty": 0.5},  # the step-by-step path inside the async engine
        {"logprobs": True, "top_logprobs": 2},
        {"max_tokens": 3},
    ]
    for kwargs in cases:
        want, got = _chat(live_server, question, **kwargs), _chat(async_server, question, **kwargs)
        assert got.message.content == want.message.content, kwargs
        assert got.finish_reason == want.finish_reason, kwargs
        if "logprobs" in kwargs:
            assert [t.token for t in got.logprobs.content] == [t.token for t in want.logprobs.content]
            for a, b in zip(got.logprobs.content, want.logprobs.content):
                assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
    assert _chat(async_server, question, stop=[stop]).finish_reason == "stop"


def test_a_client_leaving_mid_stream_leaves_the_server_answering(live_server, async_server):
    body = {
        "model": "tgi",
        "messages": [{"role": "user", "content": QUESTIONS[1]}],
        "max_tokens": 200,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    request = urllib.request.Request(
        f"{async_server.url}/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as reply:
        frames = [reply.readline() for _ in range(6)]  # a few tokens in, then hang up
    assert any(frame.startswith(b"data: ") for frame in frames)
    assert _stream_text(async_server.url, QUESTIONS[2]) == _stream_text(live_server.url, QUESTIONS[2])
