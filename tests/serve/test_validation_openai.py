"""OpenAI routes reject bad bodies with OpenAI's error shape and status, before anything reaches the engine."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.openai_schema import validate
from tests.serve.scripted_engine import ScriptedEngine, engine_info

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "hi"}]
IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}


def _error(reply, status: int, param: str | None = None, code: str | None = None) -> str:
    assert reply.status_code == status, reply.data
    assert reply.headers["Content-Type"] == "application/json"
    body = reply.get_json()
    validate(body, "ErrorResponse")
    if param is not None:
        assert body["error"]["param"] == param
    if code is not None:
        assert body["error"]["code"] == code
    return body["error"]["message"]


@pytest.mark.parametrize(
    "body, param, words",
    [
        ({}, "messages", "Missing required parameter"),
        ({"messages": []}, "messages", "at least 1"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role", "system"),
        ({"messages": [{"content": "x"}]}, "messages.0.role", "Missing"),
        ({"messages": [{"role": "user"}]}, "messages.0.content", "Missing required parameter"),
        (
            {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": None}]},
            "messages.1.content",
            "Missing required parameter",
        ),
        ({"messages": "hi"}, "messages", "list"),
        ({"messages": MESSAGES, "max_tokens": "5"}, "max_tokens", "integer"),
        ({"messages": MESSAGES, "max_tokens": 0}, "max_tokens", "below minimum"),
        ({"messages": MESSAGES, "max_completion_tokens": -1}, "max_completion_tokens", "below minimum"),
        ({"messages": MESSAGES, "temperature": 2.5}, "temperature", "above maximum"),
        ({"messages": MESSAGES, "temperature": -0.1}, "temperature", "below minimum"),
        ({"messages": MESSAGES, "top_p": 1.01}, "top_p", "above maximum"),
        ({"messages": MESSAGES, "frequency_penalty": 2.5}, "frequency_penalty", "above maximum"),
        ({"messages": MESSAGES, "presence_penalty": -3}, "presence_penalty", "below minimum"),
        ({"messages": MESSAGES, "n": 0}, "n", "below minimum"),
        ({"messages": MESSAGES, "stop": ["a", "b", "c", "d", "e"]}, "stop", "maximum length 4"),
        ({"messages": MESSAGES, "logprobs": True, "top_logprobs": 21}, "top_logprobs", "above maximum"),
        ({"messages": MESSAGES, "stream": "yes"}, "stream", "boolean"),
        ({"messages": MESSAGES, "stream_options": {"include_usage": True}}, "stream_options", "stream"),
        ({"messages": [{"role": "user", "content": [{"type": "video"}]}]}, "messages.0.content.0", "tag"),
        (
            {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "AA"}}]}]},
            "messages.0.content.0",
            "input_audio content parts are not supported: tiny-llama is a text-only model",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, IMAGE]}]},
            "messages.0.content.1",
            "image_url content parts are not supported",
        ),
        ({"messages": [{"role": "user", "content": [{"type": "file", "file": {}}]}]}, "messages.0.content.0", "file"),
        ({"messages": MESSAGES, "modalities": ["text", "audio"]}, "modalities", "'audio' is not supported"),
        ({"messages": MESSAGES, "audio": {"voice": "alloy", "format": "wav"}}, "audio", "text only"),
        ({"messages": MESSAGES, "seed": 1 << 63}, "seed", "above maximum"),
        ({"messages": MESSAGES, "seed": -(1 << 63) - 1}, "seed", "below minimum"),
        (
            {"messages": MESSAGES, "logit_bias": {"4096": 1}},
            "logit_bias",
            "token id 4096 is outside the vocabulary of 4096",
        ),
        ({"messages": MESSAGES, "logit_bias": {"-1": 1}}, "logit_bias", "token id -1"),
        ({"messages": MESSAGES, "logit_bias": {"12": 100.5}}, "logit_bias", "bias 100.5 of token id 12 is outside"),
        ({"messages": MESSAGES, "logit_bias": {"twelve": 1}}, "logit_bias", "'twelve' is not a token id"),
        ({"messages": MESSAGES, "logit_bias": {"12": "up"}}, "logit_bias.12", "number"),
        ({"messages": MESSAGES, "min_p": 1.5}, "min_p", "above maximum"),
        ({"messages": MESSAGES, "stop_token_ids": [5, 9999]}, "stop_token_ids", "token id 9999"),
        ({"messages": MESSAGES, "model": "my-lora"}, "model", "no adapter or model of that name is loaded"),
        ({"messages": MESSAGES, "store": True}, "store", "stores no completions"),
        ({"messages": MESSAGES, "service_tier": "flex"}, "service_tier", "one tier"),
        ({"messages": MESSAGES, "prediction": {"type": "content", "content": "x"}}, "prediction", "predicted"),
        ({"messages": MESSAGES, "web_search_options": {}}, "web_search_options", "web search"),
        ({"messages": MESSAGES, "metadata": {str(i): "v" for i in range(17)}}, "metadata", "at most 16"),
    ],
)
def test_bad_chat_bodies_are_400_and_never_queued(scripted, make_client, body, param, words):
    reply = make_client(scripted).post(CHAT, json=body)
    assert words in _error(reply, 400, param)
    assert scripted.submitted == []


@pytest.mark.parametrize(
    "raw",
    [
        b"{not json",
        b"",
        b"\xff\xfe",
        b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}',  # a lone surrogate: no character at all
        b'{"messages": [{"role": "user", "content": "hi"}], "stop": ["\\udfff"]}',
        b'{"messages": ' + b"[" * 100000 + b"]" * 100000 + b"}",  # deeper than the parser's recursion limit
    ],
)
def test_invalid_json_is_400(scripted, make_client, raw):
    reply = make_client(scripted).post(CHAT, data=raw, content_type="application/json")
    _error(reply, 400, code="invalid_json")
    assert scripted.submitted == []


def test_paired_surrogate_escapes_are_one_character(scripted, make_client, tokenizer):
    body = b'{"messages": [{"role": "user", "content": "smile \\ud83d\\ude00"}], "max_tokens": 2}'
    reply = make_client(scripted).post(CHAT, data=body, content_type="application/json")
    assert reply.status_code == 200, reply.data
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "smile \U0001f600"}])
    assert scripted.submitted[0].prompt_token_ids == tokenizer.encode(prompt, add_special_tokens=False)


def test_edges_of_the_ranges_are_accepted(scripted, make_client):
    client = make_client(scripted)
    body = {
        "model": "TGI",
        "messages": MESSAGES,
        "temperature": 0,
        "top_p": 1.0,
        "frequency_penalty": -2,
        "presence_penalty": 2,
        "stop": "x",
        "user": "u",
        "metadata": {"a": "1"},
        "seed": -(1 << 63),
        "logit_bias": {"0": -100, "4095": 100},
        "modalities": ["text"],
        "store": False,
        "service_tier": "auto",
        "parallel_tool_calls": False,
    }
    reply = client.post(CHAT, json=body)
    assert reply.status_code == 200, reply.data
    assert reply.get_json()["model"] == "tiny-llama"  # the served model, whichever of its names the client used


@pytest.mark.parametrize(
    "route, body, name",
    [
        (CHAT, {"messages": MESSAGES, "max_token": 5}, "max_token"),
        ("/v1/completions", {"prompt": "hi", "some_future_field": [1, 2]}, "some_future_field"),
        (CHAT, {"messages": MESSAGES, "stream": True, "stream_options": {"include_usage": True, "x": 1}}, "x"),
    ],
)
def test_an_unknown_field_is_refused_naming_it_as_openai_does(scripted, make_client, route, body, name):
    """A misspelt field must not quietly give a different answer: OpenAI answers 400 "Unrecognized request
    argument supplied"; so does this server, before anything reaches the engine."""
    reply = make_client(scripted).post(route, json=body)
    assert reply.status_code == 400, reply.data
    error = reply.get_json()["error"]
    assert error["message"].startswith("Unrecognized request argument supplied: ") and name in error["message"]
    assert error["param"].endswith(name) and error["type"] == "invalid_request_error"
    validate(reply.get_json(), "ErrorResponse")
    assert scripted.submitted == []


def test_messages_may_carry_the_fields_of_an_earlier_reply(scripted, make_client):
    """Clients send an earlier reply's message back whole (`refusal`, `annotations`, ... set to null)."""
    history = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello", "refusal": None, "annotations": [], "audio": None},
        {"role": "user", "content": "again"},
    ]
    assert make_client(scripted).post(CHAT, json={"messages": history}).status_code == 200


@pytest.mark.parametrize("name", [None, "", "tgi", "dummy", "tiny-llama", "Tiny-Llama"])
def test_the_served_names_are_accepted(scripted, make_client, name):
    reply = make_client(scripted).post(CHAT, json={"messages": MESSAGES, "model": name})
    assert reply.status_code == 200, reply.data


def test_served_model_name_lists_the_names_a_request_may_use(scripted, make_client, tiny_model_dir):
    client = make_client(scripted, {"SERVED_MODEL_NAME": "org/llama-chat, alias-two"})
    for name in ("org/llama-chat", "llama-chat", "alias-two", "tiny-llama", str(tiny_model_dir), "tgi"):
        reply = client.post(CHAT, json={"messages": MESSAGES, "model": name})
        assert reply.status_code == 200, (name, reply.data)
        assert reply.get_json()["model"] == "org/llama-chat"
    assert "Send 'org/llama-chat'" in _error(client.post(CHAT, json={"messages": MESSAGES, "model": "x"}), 400, "model")


@pytest.mark.parametrize(
    "content_type", ["application/x-www-form-urlencoded", "text/plain", "multipart/form-data; boundary=x"]
)
def test_a_body_that_is_not_json_by_its_media_type_is_415(scripted, make_client, content_type):
    client = make_client(scripted)
    data = json.dumps({"messages": MESSAGES})
    for route in (CHAT, "/v1/completions"):
        message = _error(client.post(route, data=data, content_type=content_type), 415, code="unsupported_media_type")
        assert "application/json" in message and content_type.split(";")[0] in message
    assert scripted.submitted == []


def test_json_media_types_and_none_at_all_are_accepted(scripted, make_client):
    client = make_client(scripted)
    data = json.dumps({"messages": MESSAGES, "max_tokens": 2})
    for headers in (
        {"Content-Type": "application/json; charset=utf-8"},
        {"Content-Type": "application/vnd.x+json"},
        {},
    ):
        reply = client.post(CHAT, data=data, headers=headers)
        assert reply.status_code == 200, (headers, reply.data)
    assert len(scripted.submitted) == 3


def test_prompt_longer_than_max_input_tokens(scripted, make_client):
    client = make_client(scripted.with_limits(40, 20))
    long = [{"role": "user", "content": "word " * 40}]
    message = _error(client.post(CHAT, json={"messages": long}), 400, "messages", "context_length_exceeded")
    assert "maximum input length is 20 tokens" in message
    assert scripted.submitted == []


def test_prompt_plus_max_tokens_over_max_total_tokens(scripted, make_client):
    client = make_client(scripted.with_limits(40, 30))
    reply = client.post(CHAT, json={"messages": MESSAGES, "max_tokens": 35})
    message = _error(reply, 400, "messages", "context_length_exceeded")
    assert "maximum context length is 40 tokens" in message and "35 in the completion" in message
    assert scripted.submitted == []


def test_omitted_max_tokens_fills_the_context(scripted, make_client, tokenizer):
    client = make_client(scripted.with_limits(64))
    assert client.post(CHAT, json={"messages": MESSAGES}).status_code == 200
    prompt = tokenizer.apply_chat_template(MESSAGES)
    num_prompt = len(tokenizer.encode(prompt, add_special_tokens=False))
    assert scripted.submitted[0].sampling_params.max_tokens == 64 - num_prompt


def test_template_error_is_422(tmp_path, tiny_model_dir, make_client, scripted):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir, ignore=shutil.ignore_patterns("*.safetensors"))
    template = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role here') }}{% endif %}x"
    (model_dir / "chat_template.jinja").write_text(template)
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    config["chat_template"] = template
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config))
    engine = ScriptedEngine(engine_info(str(model_dir)), scripted.script)
    reply = make_client(engine).post(CHAT, json={"messages": [{"role": "system", "content": "s"}]})
    assert "no system role here" in _error(reply, 422, code="template_error")
    assert engine.submitted == []


def test_payload_limit_is_413(scripted, make_client):
    client = make_client(scripted, {"PAYLOAD_LIMIT": "100"})
    reply = client.post(CHAT, json={"messages": [{"role": "user", "content": "x" * 200}]})
    assert "PAYLOAD_LIMIT" in _error(reply, 413)
    assert scripted.submitted == []


def test_api_key_is_required_when_set_but_not_for_health(scripted, make_client):
    client = make_client(scripted, {"API_KEY": "s3cret"})
    _error(client.post(CHAT, json={"messages": MESSAGES}), 401, code="invalid_api_key")
    _error(client.post(CHAT, json={"messages": MESSAGES}, headers={"Authorization": "Bearer nope"}), 401)
    assert scripted.submitted == []
    ok = client.post(CHAT, json={"messages": MESSAGES}, headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200
    assert client.get("/ping").status_code == 200 and client.get("/v1/models").status_code == 200


def test_unknown_route_and_method_are_json(scripted, make_client):
    client = make_client(scripted)
    _error(client.post("/v1/nothing", json={}), 404)
    _error(client.get(CHAT), 405)


def test_engine_not_ready_is_503_not_queued(scripted, make_client):
    scripted.ready = False
    client = make_client(scripted)
    _error(client.post(CHAT, json={"messages": MESSAGES}), 503)
    assert client.get("/ping").status_code == 503
    assert scripted.submitted == []


def test_completions_without_max_tokens_get_openais_default_16(scripted, make_client):
    client = make_client(scripted.with_limits(64))
    for body in ({"prompt": "hi"}, {"prompt": "hi", "max_tokens": None}, {"prompt": [5, 6, 7]}):
        assert client.post("/v1/completions", json=body).status_code == 200
        assert scripted.submitted[-1].sampling_params.max_tokens == 16
    client.post("/v1/completions", json={"prompt": "hi", "min_tokens": 20})
    assert scripted.submitted[-1].sampling_params.max_tokens == 20  # never below min_tokens
    client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 40})
    assert scripted.submitted[-1].sampling_params.max_tokens == 40
    long_prompt = list(range(5, 5 + 56))  # a 64-token context: 8 left
    assert client.post("/v1/completions", json={"prompt": long_prompt}).status_code == 200
    assert scripted.submitted[-1].sampling_params.max_tokens == 8
