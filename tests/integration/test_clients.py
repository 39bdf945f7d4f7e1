"""The official clients users point at us, unchanged, against the real server on loopback."""

from __future__ import annotations

import json
import urllib.request

import openai
import pytest
from huggingface_hub import InferenceClient

from tests import cpu_kernels
from tests.openai_schema import validate

MESSAGES = [{"role": "user", "content": "What is deep learning?"}]


def _sse_events(url: str, body: dict) -> tuple[str, list[str]]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as reply:
        raw = reply.read().decode()
        content_type = reply.headers["Content-Type"]
    assert raw.endswith("\n\n")
    return content_type, [frame for frame in raw.split("\n\n") if frame]


def test_openai_client_non_streaming(live_server):
    client = openai.OpenAI(base_url=f"{live_server.url}/v1", api_key="-")
    raw = client.chat.completions.with_raw_response.create(model="tgi", messages=MESSAGES, max_tokens=8)
    body = raw.http_response.json()
    validate(body, "CreateChatCompletionResponse")
    completion = raw.parse()
    assert completion.id.startswith("chatcmpl-")
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].finish_reason in ("stop", "length")
    usage = completion.usage
    assert usage.completion_tokens <= 8 and usage.prompt_tokens > 5
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_openai_client_streaming_matches_raw_sse_frames(live_server):
    client = openai.OpenAI(base_url=f"{live_server.url}/v1", api_key="-")
    chunks = list(
        client.chat.completions.create(
            model="tgi",
            messages=MESSAGES,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert len({chunk.id for chunk in chunks}) == 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish in (["stop"], ["length"])
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.completion_tokens <= 12

    # The same request on the wire: exact framing and every chunk valid per OpenAI's schema.
    content_type, frames = _sse_events(
        f"{live_server.url}/v1/chat/completions",
        {"model": "tgi", "messages": MESSAGES, "max_tokens": 12, "temperature": 0, "stream": True},
    )
    assert content_type.startswith("text/event-stream")
    assert all(frame.startswith("data: ") for frame in frames)
    assert frames[-1] == "data: [DONE]"
    parsed = [json.loads(frame[len("data: ") :]) for frame in frames[:-1]]
    for chunk in parsed:
        validate(chunk, "CreateChatCompletionStreamResponse")
    assert parsed[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in parsed) == text


def test_huggingface_hub_inference_client(live_server):
    client = InferenceClient(base_url=live_server.url)
    reply = client.chat_completion(messages=MESSAGES, max_tokens=8, temperature=0)
    assert reply.choices[0].message.role == "assistant"
    streamed = "".join(
        chunk.choices[0].delta.content or ""
        for chunk in client.chat_completion(messages=MESSAGES, max_tokens=8, temperature=0, stream=True)
        if chunk.choices
    )
    assert streamed == reply.choices[0].message.content


@pytest.fixture()
def sagemaker_local_session(live_server, monkeypatch):
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("SAGEMAKER_SUPPRESS_V2_WARNING", "1")
    import sagemaker.local.local_session as local_session

    # No docker CLI is needed to reach a server that already runs (sagemaker_sdk.md §2a).
    monkeypatch.setattr(local_session, "get_docker_host", lambda: "127.0.0.1")
    session = local_session.LocalSession()
    session.config = {"local": {"serving_port": live_server.port}}
    return session


def test_sagemaker_huggingface_predictor_messages(sagemaker_local_session, live_server):
    from sagemaker.huggingface import HuggingFacePredictor

    predictor = HuggingFacePredictor("local-endpoint", sagemaker_session=sagemaker_local_session)
    reply = predictor.predict({"messages": MESSAGES, "max_tokens": 8, "temperature": 0})
    validate(reply, "CreateChatCompletionResponse")
    assert reply["choices"][0]["message"]["role"] == "assistant"

    tgi_reply = predictor.predict({"inputs": "What is deep learning?", "parameters": {"max_new_tokens": 4}})
    assert isinstance(tgi_reply, list) and "generated_text" in tgi_reply[0]


def test_info_reports_what_the_engine_sized_at_start_up(live_server):
    with urllib.request.urlopen(f"{live_server.url}/info", timeout=10) as reply:
        info = json.loads(reply.read())
    engine = info["engine"]
    # tests/live.py gives the engine a 64 MiB CPU budget; the tiny model's KV is 4 KiB per token in fp32.
    assert engine["kv_cache_bytes"] <= 64 * 1024 * 1024
    assert engine["kv_cache_tokens"] == engine["kv_cache_blocks"] * engine["kv_cache_block_size"]
    assert engine["kv_cache_tokens"] * 4096 == engine["kv_cache_bytes"]
    assert engine["device"] == "cpu" and engine["prefix_caching"]
    assert engine["attention_backend"] == cpu_kernels.expected_backend()
    assert info["max_total_tokens"] == engine["max_model_len"]
