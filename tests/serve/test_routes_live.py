"""The OpenAI routes end to end on a real engine process with the tiny model: replies and streams, stop strings,
derived seeds, logprobs, batched prompts, disconnects and engine death.

Where an outcome depends on what the random model says, a first greedy request learns its output.
"""

from __future__ import annotations

import json

import gevent
import pytest

from serve.engine_client import SocketEngineClient
from tests.live import start_engine
from tests.openai_schema import validate
from tests.serve.helpers import openai_chunks

MESSAGES = [{"role": "user", "content": "What is deep learning?"}]
CHAT = "/v1/chat/completions"


def _content(reply: dict, index: int = 0) -> str:
    return reply["choices"][index]["message"]["content"]


def _streamed_texts(chunks: list[dict], num_choices: int) -> list[str]:
    """Each choice's content deltas joined, by choice index."""
    texts = [""] * num_choices
    for chunk in chunks:
        for choice in chunk["choices"]:
            texts[choice["index"]] += choice["delta"].get("content", "")
    return texts


def test_chat_reply_and_stream_agree(live_client, tokenizer):
    client = live_client()
    body = {"model": "tgi", "messages": MESSAGES, "max_tokens": 6, "temperature": 0}
    reply = client.post(CHAT, json=body).get_json()
    validate(reply, "CreateChatCompletionResponse")
    assert reply["model"] == "tiny-llama" and reply["id"].startswith("chatcmpl-")
    prompt = tokenizer.apply_chat_template(MESSAGES)
    usage = reply["usage"]
    assert usage["prompt_tokens"] == len(tokenizer.encode(prompt, add_special_tokens=False))
    assert usage["completion_tokens"] == 6 and reply["choices"][0]["finish_reason"] == "length"
    stream = client.post(CHAT, json={**body, "stream": True, "stream_options": {"include_usage": True}})
    chunks = openai_chunks(stream)
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert _streamed_texts(chunks, 1) == [_content(reply)]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6


def test_stop_spanning_tokens_is_excluded_in_both_modes(live_client, live_engine_client):
    client = live_client()
    body = {"messages": MESSAGES, "max_tokens": 12, "temperature": 0, "logprobs": True}
    learned = client.post(CHAT, json=body).get_json()
    text = _content(learned)
    pieces = [entry["token"] for entry in learned["choices"][0]["logprobs"]["content"]]
    # Three whole tokens of two characters or more, each a whole text (no part of a character), from the start.
    first = next(
        i
        for i in range(1, len(pieces) - 2)
        if all(len(p) >= 2 and "\ufffd" not in p for p in pieces[i : i + 3])
        and text.startswith("".join(pieces[: i + 3]))
    )
    # From the middle of the first to the middle of the third, so no single token holds it.
    stop = pieces[first][-1:] + pieces[first + 1] + pieces[first + 2][:1]
    expected = text[: text.index(stop)]
    body = {"messages": MESSAGES, "max_tokens": 500, "temperature": 0, "ignore_eos": True, "stop": [stop]}
    reply = client.post(CHAT, json=body).get_json()
    assert _content(reply) == expected and reply["choices"][0]["finish_reason"] == "stop"
    assert live_engine_client.num_in_flight == 0  # the engine request was aborted, not left to run 500 tokens
    chunks = openai_chunks(client.post(CHAT, json={**body, "stream": True}))
    # Released text is never taken back, so the join equal to `expected` means no part of the stop ever streamed.
    assert _streamed_texts(chunks, 1) == [expected]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert live_engine_client.num_in_flight == 0


def test_several_choices_with_derived_seeds(live_client, tokenizer):
    client = live_client()
    body = {"messages": MESSAGES, "n": 3, "seed": 7, "temperature": 1.0, "max_tokens": 5, "ignore_eos": True}
    reply = client.post(CHAT, json=body).get_json()
    validate(reply, "CreateChatCompletionResponse")
    assert [c["index"] for c in reply["choices"]] == [0, 1, 2]
    texts = [_content(reply, i) for i in range(3)]
    assert len(set(texts)) == 3
    # Choice i samples with seed + i: the same text as a single choice asked with that seed.
    solos = [_content(client.post(CHAT, json={**body, "n": 1, "seed": 7 + i}).get_json()) for i in range(3)]
    assert solos == texts
    num_prompt = len(tokenizer.encode(tokenizer.apply_chat_template(MESSAGES), add_special_tokens=False))
    assert reply["usage"]["prompt_tokens"] == num_prompt and reply["usage"]["completion_tokens"] == 15
    chunks = openai_chunks(client.post(CHAT, json={**body, "stream": True}))
    assert len({c["id"] for c in chunks}) == 1
    assert _streamed_texts(chunks, 3) == texts
    for index in range(3):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert mine[-1]["finish_reason"] == "length"


def test_logprobs_with_bytes_validate(live_client):
    client = live_client()
    body = {
        "messages": MESSAGES,
        "logprobs": True,
        "top_logprobs": 2,
        "max_tokens": 5,
        "temperature": 0,
        "ignore_eos": True,
    }
    reply = client.post(CHAT, json=body).get_json()
    validate(reply, "CreateChatCompletionResponse")
    content = reply["choices"][0]["logprobs"]["content"]
    assert len(content) == 5
    # The bytes are exact even where a token holds part of a character (the text shows U+FFFD there).
    assert b"".join(bytes(entry["bytes"]) for entry in content).decode(errors="replace") == _content(reply)
    for entry in content:
        assert entry["logprob"] <= 0 and len(entry["top_logprobs"]) == 2
        assert entry["top_logprobs"][0]["logprob"] >= entry["top_logprobs"][1]["logprob"]
        # greedy: the chosen token is the most likely one
        assert entry["top_logprobs"][0]["token"] == entry["token"]
        assert entry["top_logprobs"][0]["logprob"] == pytest.approx(entry["logprob"], abs=1e-5)
    chunks = openai_chunks(client.post(CHAT, json={**body, "stream": True}))
    streamed = [e for c in chunks for e in (c["choices"][0]["logprobs"] or {}).get("content", [])]
    assert [(e["token"], e["bytes"]) for e in streamed] == [(e["token"], e["bytes"]) for e in content]
    assert [e["logprob"] for e in streamed] == pytest.approx([e["logprob"] for e in content], abs=1e-5)


def test_completions_batch_of_prompts(live_client, tokenizer):
    client = live_client()
    prompts = ["one", "two words"]
    params = {"max_tokens": 3, "temperature": 0, "ignore_eos": True}
    alone = [client.post("/v1/completions", json={"prompt": p, **params}).get_json() for p in prompts]
    reply = client.post("/v1/completions", json={"prompt": prompts, "n": 2, "echo": True, **params}).get_json()
    validate(reply, "CreateCompletionResponse")
    assert [c["index"] for c in reply["choices"]] == [0, 1, 2, 3]
    expected = [p + a["choices"][0]["text"] for p, a in zip(prompts, alone) for _ in range(2)]
    assert [c["text"] for c in reply["choices"]] == expected
    assert all(len(a["choices"][0]["text"]) > 0 for a in alone)
    # Each prompt counts once, however many choices share it.
    num_prompt = sum(len(tokenizer.encode(p, add_special_tokens=True)) for p in prompts)
    assert reply["usage"]["prompt_tokens"] == num_prompt and reply["usage"]["completion_tokens"] == 12
    too_many = client.post("/v1/completions", json={"prompt": ["a"] * 5})
    assert too_many.status_code == 400 and "maximum allowed batch size of 4" in too_many.get_json()["error"]["message"]
    assert client.get("/ping").status_code == 200
    info = client.get("/info").get_json()
    assert info["model_id"] == "tiny-llama" and info["max_total_tokens"] == 2048


def test_client_disconnect_aborts_the_engine_request(live_client, live_engine_client):
    client = live_client()
    state = client.application.extensions["serve"]
    free_before = live_engine_client.last_heartbeat.num_free_blocks
    body = {"messages": MESSAGES, "max_tokens": 1500, "temperature": 0, "ignore_eos": True, "stream": True}
    reply = client.post(CHAT, json=body, buffered=False)
    stream = iter(reply.response)
    assert b'"role":"assistant"' in next(stream)
    assert next(stream).startswith(b"data: ")  # a generated token: the engine request is running
    assert state.num_in_flight == 1 and live_engine_client.num_in_flight == 1
    reply.close()
    assert state.num_in_flight == 0 and live_engine_client.num_in_flight == 0
    # The live_client fixture then waits for fresh heartbeats: nothing running, every block free again.
    assert free_before == live_engine_client.info.num_kv_blocks


def test_engine_death_mid_generation_fails_the_requests_and_health(make_client):
    handle = start_engine()
    engine = SocketEngineClient(handle.address)  # the heartbeats' 10 s: the closed socket must tell first
    try:
        assert engine.wait_ready(30)
        client = make_client(engine)
        long = {"max_tokens": 1500, "temperature": 0, "ignore_eos": True}
        collecting = gevent.spawn(client.post, CHAT, json={"messages": MESSAGES, **long})
        tgi = gevent.spawn(client.post, "/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 1500}})
        reply = client.post(CHAT, json={"messages": MESSAGES, "stream": True, **long}, buffered=False)
        stream = iter(reply.response)
        next(stream), next(stream)  # the role chunk, then a token: the engine is generating
        assert engine.num_in_flight == 3
        handle.process.kill()
        with gevent.Timeout(5):  # the engine's end of the socket closed: no wait for the heartbeat timeout
            rest = b"".join(stream).decode()
        reply.close()
        frames = [f.removeprefix("data: ") for f in rest.split("\n\n") if f]
        assert frames[-1] == "[DONE]" and "the engine process exited" in frames[-2]
        validate(json.loads(frames[-2]), "ErrorResponse")
        gevent.joinall([collecting, tgi], timeout=5, raise_error=True)
        assert collecting.value.status_code == 500
        assert "the engine process exited" in collecting.value.get_json()["error"]["message"]
        assert tgi.value.status_code == 424 and tgi.value.get_json()["error_type"] == "generation"
        assert client.get("/ping").status_code == 503  # SageMaker replaces an instance whose engine is gone
        assert client.post(CHAT, json={"messages": MESSAGES}).status_code == 503
    finally:
        engine.close()
        handle.stop()


def test_top_p_zero_keeps_only_the_most_likely_token(live_client):
    """OpenAI accepts top_p=0 (TGI's 0 < top_p < 1 does not apply on /v1): sampling from the top token alone."""
    client = live_client()
    greedy = client.post(CHAT, json={"messages": MESSAGES, "max_tokens": 8, "temperature": 0}).get_json()
    for route_body in ({"temperature": 1.0, "top_p": 0}, {"temperature": 1.5, "top_p": 0.0, "seed": 3}):
        reply = client.post(CHAT, json={"messages": MESSAGES, "max_tokens": 8, **route_body})
        assert reply.status_code == 200, reply.data
        assert _content(reply.get_json()) == _content(greedy)
    completion = client.post("/v1/completions", json={"prompt": "Deep learning", "max_tokens": 4, "top_p": 0})
    assert completion.status_code == 200, completion.data
