"""The whole server at its default `DTYPE=auto` (the other tests pin fp32, transformers' precision): on a CPU with
native bf16 that is the bf16 engine. Chat (whole and streamed, with logprobs and penalties), completions and TGI's
`/generate` with details all answer in their formats, with exactly the tokens asked for."""

from __future__ import annotations

import json
import math
import urllib.request

import openai
import pytest

from model_handler.config import auto_cpu_dtype
from model_handler.cpu_features import has_native_bf16
from tests.live import LiveServer, start_server
from tests.openai_schema import validate


@pytest.fixture(scope="module")
def default_server() -> LiveServer:
    server = start_server({"DTYPE": "auto"})
    yield server
    server.stop()


def _post(server: LiveServer, path: str, body: dict) -> dict:
    request = urllib.request.Request(
        server.url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as reply:
        return json.load(reply)


def test_info_reports_the_dtype_auto_chose(default_server):
    with urllib.request.urlopen(default_server.url + "/info", timeout=10) as reply:
        assert json.load(reply)["engine"]["dtype"] == auto_cpu_dtype(has_native_bf16())


def test_chat_completions_and_generate_answer_at_the_default_dtype(default_server):
    messages = [{"role": "user", "content": "Tell me about rivers."}]
    reply = _post(
        default_server,
        "/v1/chat/completions",
        {
            "model": "tgi",
            "messages": messages,
            "max_tokens": 16,
            "min_tokens": 16,
            "ignore_eos": True,
            "logprobs": True,
            "top_logprobs": 2,
            "frequency_penalty": 0.5,
        },
    )
    validate(reply, "CreateChatCompletionResponse")
    assert reply["usage"]["completion_tokens"] == 16 and reply["choices"][0]["finish_reason"] == "length"
    logprobs = reply["choices"][0]["logprobs"]["content"]
    assert len(logprobs) == 16 and all(math.isfinite(t["logprob"]) and t["logprob"] <= 0 for t in logprobs)

    client = openai.OpenAI(base_url=f"{default_server.url}/v1", api_key="-")
    stream = client.chat.completions.create(
        model="tgi",
        messages=messages,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"min_tokens": 12, "ignore_eos": True},
    )
    chunks = list(stream)
    assert chunks[-1].usage.completion_tokens == 12
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    completion = _post(
        default_server,
        "/v1/completions",
        {"model": "tgi", "prompt": "Once upon", "max_tokens": 8, "min_tokens": 8, "ignore_eos": True},
    )
    validate(completion, "CreateCompletionResponse")
    assert completion["usage"]["completion_tokens"] == 8

    generated = _post(
        default_server,
        "/generate",
        {"inputs": "Once upon", "parameters": {"max_new_tokens": 8, "details": True, "repetition_penalty": 1.2}},
    )
    details = generated["details"]
    assert 1 <= details["generated_tokens"] == len(details["tokens"]) <= 8  # TGI has no ignore_eos: EOS may end it
    assert details["finish_reason"] in ("length", "eos_token")
    assert all(math.isfinite(t["logprob"]) for t in details["tokens"])
