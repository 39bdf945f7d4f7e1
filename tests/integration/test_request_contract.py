"""Issue 17 through the real server with the clients users have: the `openai` client (native fields, `extra_body` for
vLLM's extensions), huggingface_hub's InferenceClient for TGI's, raw HTTP for media types, and the API's own
description at /openapi.json and /docs."""

from __future__ import annotations

import http.client
import json
import urllib.request

import openai
import pytest
from huggingface_hub import InferenceClient
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.errors import ValidationError as HubValidationError
from openapi_spec_validator import validate as validate_spec

from serve.tokenizer import TextTokenizer

MESSAGES = [{"role": "user", "content": "What is deep learning?"}]


@pytest.fixture()
def oai(live_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live_server.url}/v1", api_key="-", max_retries=0)


def test_logit_bias_and_twenty_top_logprobs(oai):
    plain = oai.chat.completions.create(model="tgi", messages=MESSAGES, max_tokens=4, temperature=0, logprobs=True)
    first = plain.choices[0].logprobs.content[0]
    forced = oai.chat.completions.create(
        model="tgi",
        messages=MESSAGES,
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=20,
        logit_bias={"1500": 100},
    )
    tokens = forced.choices[0].logprobs.content
    assert {t.token for t in tokens} == {tokens[0].token} != {first.token}
    assert all(len(t.top_logprobs) == 20 for t in tokens)


def test_vllm_extensions_through_extra_body(oai, tiny_model_dir):
    plain = oai.chat.completions.create(
        model="tgi", messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True, extra_body={"ignore_eos": True}
    )
    greedy = plain.choices[0].message.content
    sampled = oai.chat.completions.create(
        model="tgi",
        messages=MESSAGES,
        max_tokens=6,
        temperature=1.5,
        seed=4,
        extra_body={"min_p": 1.0, "ignore_eos": True},
    )
    assert sampled.choices[0].message.content == greedy  # min_p 1 keeps the most likely token only
    tokens = [t.token for t in plain.choices[0].logprobs.content]
    third_id = TextTokenizer.load(str(tiny_model_dir)).encode(tokens[2], add_special_tokens=False)[0]
    stopped = oai.chat.completions.create(
        model="tgi", messages=MESSAGES, max_tokens=6, temperature=0, extra_body={"stop_token_ids": [third_id]}
    )
    assert stopped.choices[0].message.content == "".join(tokens[:2])
    assert stopped.choices[0].finish_reason == "stop"
    options = {"include_usage": True, "continuous_usage_stats": True}
    stream = oai.chat.completions.create(
        model="tgi",
        messages=MESSAGES,
        max_tokens=4,
        stream=True,
        stream_options=options,
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    assert [c.usage.completion_tokens for c in chunks if c.choices][-1] == 4


def test_echo_with_logprobs_through_the_client(oai):
    completion = oai.completions.create(model="tgi", prompt="Deep learning is", max_tokens=2, echo=True, logprobs=1)
    logprobs = completion.choices[0].logprobs
    assert completion.choices[0].text.startswith("Deep learning is")
    assert logprobs.token_logprobs[0] is None and all(lp < 0 for lp in logprobs.token_logprobs[1:])
    assert logprobs.top_logprobs[0] is None and len(logprobs.tokens) == len(logprobs.token_logprobs)


@pytest.mark.parametrize(
    "kwargs, param",
    [
        ({"model": "my-lora-adapter"}, "model"),
        ({"seed": 1 << 63}, "seed"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,x"}}]}]},
            "messages.0.content.0",
        ),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
        ({"logit_bias": {"999999": 5}}, "logit_bias"),
    ],
)
def test_refusals_are_bad_requests_naming_the_field(oai, kwargs, param):
    body = {"model": "tgi", "messages": MESSAGES, "max_tokens": 2, **kwargs}
    with pytest.raises(openai.BadRequestError) as caught:
        oai.chat.completions.create(**body)
    assert caught.value.body["param"] == param


def test_tgi_fields_through_huggingface_hub(live_server):
    client = InferenceClient(base_url=live_server.url)
    out = client.text_generation("Deep learning is", max_new_tokens=3, details=True, decoder_input_details=True)
    prefill = out.details.prefill
    assert prefill[0].logprob is None and all(t.logprob < 0 for t in prefill[1:]) and len(prefill) > 2
    typical = [client.text_generation("Deep learning is", max_new_tokens=6, typical_p=0.4, seed=9) for _ in range(2)]
    assert typical[0] == typical[1]
    for kwargs, words in (({"watermark": True}, "watermark"), ({"adapter_id": "my-lora"}, "no adapter 'my-lora'")):
        with pytest.raises((HfHubHTTPError, HubValidationError)) as caught:
            client.text_generation("Deep learning is", max_new_tokens=2, **kwargs)
        assert words in str(caught.value)


def _post(url: str, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict]:
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    connection.request("POST", path, body=body, headers=headers)
    reply = connection.getresponse()
    status, data = reply.status, json.loads(reply.read() or b"null")
    connection.close()
    return status, data


def test_media_types(live_server):
    chat = json.dumps({"messages": MESSAGES, "max_tokens": 2}).encode()
    status, body = _post(
        live_server.url, "/v1/chat/completions", chat, {"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert status == 415 and "application/json" in body["error"]["message"]
    tgi = json.dumps({"inputs": "hi", "parameters": {"max_new_tokens": 2}}).encode()
    status, body = _post(live_server.url, "/generate", tgi, {"Content-Type": "text/plain"})
    assert status == 415 and "application/json" in body["error"]
    assert _post(live_server.url, "/v1/chat/completions", chat, {})[0] == 200  # no Content-Type at all
    assert _post(live_server.url, "/invocations", tgi, {"Content-Type": "text/plain"})[0] == 200


def test_openapi_and_docs_are_served(live_server):
    with urllib.request.urlopen(f"{live_server.url}/openapi.json", timeout=30) as reply:
        document = json.loads(reply.read())
    validate_spec(document)
    assert "/v1/chat/completions" in document["paths"]
    with urllib.request.urlopen(f"{live_server.url}/docs", timeout=30) as reply:
        assert "swagger-ui-bundle.js" in reply.read().decode()
