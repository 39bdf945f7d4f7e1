"""The routes end to end on a real engine process with the tiny model: replies, streams, stops, seeds, aborts."""
from __future__ import annotations

import json

import gevent
import pytest

from tests.openai_schema import validate

MESSAGES = [{"role": "user", "content": "What is deep learning?"}]
CHAT = "/v1/chat/completions"


@pytest.fixture()
def client(live_engine_client, make_client):
    client = make_client(live_engine_client)
    yield client
    _wait_idle(live_engine_client)


def _wait_idle(engine, free_blocks: int | None = None) -> None:
    """Wait (cooperatively: the engine client reads in a greenlet) until the engine runs nothing."""
    for _ in range(80):
        heartbeat = engine.last_heartbeat
        if heartbeat.num_running == 0 and heartbeat.num_waiting == 0:
            if free_blocks is None or heartbeat.num_free_blocks == free_blocks:
                return
        gevent.sleep(0.1)
    raise AssertionError(f"engine still busy: {engine.last_heartbeat}")


def _chunks(reply) -> list[dict]:
    frames = [f.removeprefix("data: ") for f in reply.get_data(as_text=True).split("\n\n") if f]
    assert frames[-1] == "[DONE]"
    chunks = [json.loads(f) for f in frames[:-1]]
    for chunk in chunks:
        validate(chunk, "CreateChatCompletionStreamResponse")
    return chunks


def test_chat_reply_and_stream_agree(client, tokenizer):
    body = {"model": "tgi", "messages": MESSAGES, "max_tokens": 6, "temperature": 0}
    reply = client.post(CHAT, json=body).get_json()
    validate(reply, "CreateChatCompletionResponse")
    assert reply["model"] == "tiny-llama" and reply["id"].startswith("chatcmpl-")
    prompt = tokenizer.apply_chat_template(MESSAGES)
    usage = reply["usage"]
    assert usage["prompt_tokens"] == len(tokenizer.encode(prompt, add_special_tokens=False))
    assert usage["completion_tokens"] == 6 and reply["choices"][0]["finish_reason"] == "length"
    stream = client.post(CHAT, json={**body, "stream": True, "stream_options": {"include_usage": True}})
    chunks = _chunks(stream)
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == reply["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6


def test_stop_string_from_real_output_is_cut(client):
    body = {"messages": MESSAGES, "max_tokens": 10, "temperature": 0}
    text = client.post(CHAT, json=body).get_json()["choices"][0]["message"]["content"]
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert len(stop) == 3
    reply = client.post(CHAT, json={**body, "stop": [stop]}).get_json()
    assert reply["choices"][0]["message"]["content"] == text[: text.index(stop)]
    assert reply["choices"][0]["finish_reason"] == "stop"


def test_seeded_sampling_is_reproducible_and_choices_differ(client):
    body = {"messages": MESSAGES, "max_tokens": 6, "temperature": 1.0, "seed": 1234, "n": 2}
    first = client.post(CHAT, json=body).get_json()
    second = client.post(CHAT, json=body).get_json()
    texts = [c["message"]["content"] for c in first["choices"]]
    assert texts == [c["message"]["content"] for c in second["choices"]]
    assert texts[0] != texts[1]


def test_logprobs_from_the_engine(client):
    body = {"messages": MESSAGES, "max_tokens": 3, "temperature": 0, "logprobs": True, "top_logprobs": 2}
    reply = client.post(CHAT, json=body).get_json()
    validate(reply, "CreateChatCompletionResponse")
    content = reply["choices"][0]["logprobs"]["content"]
    assert len(content) == 3
    for entry in content:
        assert entry["logprob"] <= 0 and len(entry["top_logprobs"]) == 2
        # greedy: the chosen token is the most likely one
        assert entry["top_logprobs"][0]["logprob"] == pytest.approx(entry["logprob"], abs=1e-5)


def test_tgi_generate_and_stream_agree(client):
    body = {"inputs": "Deep learning is", "parameters": {"max_new_tokens": 5, "details": True}}
    reply = client.post("/generate", json=body).get_json()
    details = reply["details"]
    assert details["finish_reason"] == "length" and details["generated_tokens"] == 5 and details["seed"] is None
    events = [
        json.loads(f.removeprefix("data: "))
        for f in client.post("/generate_stream", json=body).get_data(as_text=True).split("\n\n")
        if f
    ]
    assert [e["token"]["id"] for e in events] == [t["id"] for t in details["tokens"]]
    assert events[-1]["generated_text"] == reply["generated_text"]
    assert events[-1]["details"]["input_length"] > 0
    full = client.post("/invocations", json=body).get_json()
    assert full == [{"generated_text": "Deep learning is" + reply["generated_text"], "details": details}]


def test_disconnect_mid_stream_frees_the_kv_cache(client, live_engine_client):
    _wait_idle(live_engine_client)
    free_before = live_engine_client.last_heartbeat.num_free_blocks
    body = {"messages": MESSAGES, "max_tokens": 500, "temperature": 0, "stream": True}
    reply = client.post(CHAT, json=body, buffered=False)
    stream = iter(reply.response)
    next(stream), next(stream)  # role chunk, then a generated token: the engine request is running
    reply.close()
    _wait_idle(live_engine_client, free_before)


def test_completions_and_small_routes(client):
    reply = client.post("/v1/completions", json={"prompt": ["Hello", "World"], "max_tokens": 3, "temperature": 0})
    body = reply.get_json()
    validate(body, "CreateCompletionResponse")
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert client.get("/ping").status_code == 200
    info = client.get("/info").get_json()
    assert info["model_id"] == "tiny-llama" and info["max_total_tokens"] == 2048
