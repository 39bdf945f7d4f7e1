"""Route behaviour for the outcomes the real engine cannot be made to produce on demand: a character split over
tokens at a chosen point, an engine error in the middle of generation, an exception from the engine client.
The engine is scripted (see scripted_engine.py); the rest of the path is real. Everything else runs on the real
engine (test_routes_live*.py)."""

from __future__ import annotations

import json

from model_handler.engine_protocol import EngineClient, EngineRequest, FinishReason, OutputStream, RequestOutput
from model_handler.sampling_params import SamplingParams
from tests.openai_schema import validate
from tests.serve.helpers import openai_chunks, sse_frames
from tests.serve.scripted_engine import ScriptedEngine, outputs_for

MESSAGES = [{"role": "user", "content": "hi"}]
EOS = 2


def _engine_with(scripted: ScriptedEngine, script) -> ScriptedEngine:
    return ScriptedEngine(scripted.info, script)


def test_split_character_never_streams_a_replacement_char(scripted, make_client, tokenizer):
    ids = tokenizer.encode("a😀b 日本", add_special_tokens=False)
    engine = _engine_with(scripted, lambda req: outputs_for(req, ids + [EOS], FinishReason.EOS))
    client = make_client(engine)
    chunks = openai_chunks(client.post("/v1/chat/completions", json={"messages": MESSAGES, "stream": True}))
    contents = [c["choices"][0]["delta"].get("content") for c in chunks]
    assert "".join(c or "" for c in contents) == "a😀b 日本"
    assert not any("\ufffd" in (c or "") for c in contents)
    events = [json.loads(f) for f in sse_frames(client.post("/generate_stream", json={"inputs": "x"}))]
    assert [e["token"]["text"] for e in events[:5]] == ["a", "", "", "", "😀"]


def test_engine_error_mid_generation(scripted, make_client):
    engine = _engine_with(scripted, lambda req: outputs_for(req, [43, 72], error="CUDA out of memory"))
    client = make_client(engine)
    reply = client.post("/v1/chat/completions", json={"messages": MESSAGES})
    assert reply.status_code == 500 and "CUDA out of memory" in reply.get_json()["error"]["message"]
    reply = client.post("/generate", json={"inputs": "x"})
    assert reply.status_code == 424 and reply.get_json() == {
        "error": "Request failed during generation: CUDA out of memory",
        "error_type": "generation",
    }
    chunks = openai_chunks(client.post("/v1/chat/completions", json={"messages": MESSAGES, "stream": True}))
    assert "CUDA out of memory" in chunks[-1]["error"]["message"]
    validate(chunks[-1], "ErrorResponse")
    frames = sse_frames(client.post("/v1/completions", json={"prompt": "x", "stream": True}))
    assert frames[-1] == "[DONE]" and "CUDA out of memory" in json.loads(frames[-2])["error"]["message"]
    frames = sse_frames(client.post("/generate_stream", json={"inputs": "x"}))
    assert json.loads(frames[-1]) == {
        "error": "Request failed during generation: CUDA out of memory",
        "error_type": "generation",
    }


def test_request_the_engine_rejects_is_a_4xx_in_each_dialect(scripted, make_client):
    """REJECTED (the engine found the request can never run) is the client's to fix: 400 on /v1, 422 on TGI."""
    engine = _engine_with(
        scripted,
        lambda req: [RequestOutput.failure(req.request_id, FinishReason.REJECTED, "needs 9 KV blocks, has 8")],
    )
    client = make_client(engine)
    reply = client.post("/v1/chat/completions", json={"messages": MESSAGES})
    assert reply.status_code == 400 and reply.get_json()["error"]["message"] == "needs 9 KV blocks, has 8"
    validate(reply.get_json(), "ErrorResponse")
    reply = client.post("/generate", json={"inputs": "x"})
    assert reply.status_code == 422 and reply.get_json() == {
        "error": "Input validation error: needs 9 KV blocks, has 8",
        "error_type": "validation",
    }
    assert client.application.extensions["serve"].num_in_flight == 0


def test_engine_protocol_is_what_both_clients_offer(scripted, live_engine_client):
    """The routes rely on `EngineClient` only: the real socket client and this scripted one both satisfy it."""
    for client in (live_engine_client, scripted):
        assert isinstance(client, EngineClient)
        stream = client.submit(EngineRequest(f"protocol-{id(client)}", [1, 2], SamplingParams(max_tokens=1)))
        assert isinstance(stream, OutputStream)
        assert [output.finished for output in stream] == [True]


def test_unexpected_exception_is_a_json_500(scripted, make_client):
    def broken(request):
        raise RuntimeError("boom")

    client = make_client(_engine_with(scripted, broken))
    reply = client.post("/v1/chat/completions", json={"messages": MESSAGES})
    assert reply.status_code == 500 and reply.get_json()["error"]["type"] == "server_error"
    reply = client.post("/generate", json={"inputs": "x"})
    assert reply.status_code == 500 and set(reply.get_json()) == {"error", "error_type"}
    assert client.application.extensions["serve"].num_in_flight == 0


def test_a_stopping_worker_says_unhealthy_then_ends_its_streams_with_an_error(scripted, make_client, tokenizer):
    """What the gunicorn worker does on SIGTERM (serve/http_worker.py): health turns 503 at once while requests
    go on; when the grace period is over, each stream ends with an error event (and [DONE] on /v1) and new
    requests are refused."""
    from serve.app import serve_state

    ids = tokenizer.encode("one two three four five six", add_special_tokens=False)
    engine = _engine_with(scripted, lambda req: outputs_for(req, ids + [EOS], FinishReason.EOS))
    client = make_client(engine)
    state = serve_state(client.application)
    reply = client.post("/v1/chat/completions", json={"messages": MESSAGES, "stream": True}, buffered=False)
    stream = iter(reply.response)
    assert b'"role":"assistant"' in next(stream) and b'"content"' in next(stream)
    state.begin_drain()
    assert client.get("/ping").status_code == 503
    state.end_in_flight()
    frames = [f.removeprefix("data: ") for f in b"".join(stream).decode().split("\n\n") if f]
    reply.close()
    assert frames[-1] == "[DONE]"
    error = json.loads(frames[-2])
    validate(error, "ErrorResponse")
    assert error["error"]["code"] == "model_not_ready" and "SHUTDOWN_GRACE_PERIOD" in error["error"]["message"]
    assert engine.aborted == [engine.submitted[0].request_id]
    refused = client.post("/generate", json={"inputs": "x"})
    assert refused.status_code == 503 and "shutting down" in refused.get_json()["error"]
