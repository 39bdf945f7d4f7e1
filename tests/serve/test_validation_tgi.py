"""TGI routes reject bad bodies with TGI's messages, `{"error", "error_type"}` bodies and status codes."""

from __future__ import annotations

import pytest


def _tgi_error(reply, status: int, error_type: str = "validation") -> str:
    assert reply.status_code == status, reply.data
    assert reply.headers["Content-Type"] == "application/json"
    body = reply.get_json()
    assert set(body) == {"error", "error_type"} and body["error_type"] == error_type
    return body["error"]


@pytest.mark.parametrize(
    "parameters, message",
    [
        ({"temperature": 0.0}, "Input validation error: `temperature` must be strictly positive"),
        ({"repetition_penalty": 0}, "Input validation error: `repetition_penalty` must be strictly positive"),
        ({"frequency_penalty": 2.5}, "Input validation error: `frequency_penalty` must be >= -2.0 and <= 2.0"),
        ({"top_p": 1.0}, "Input validation error: `top_p` must be > 0.0 and < 1.0"),
        ({"top_p": 0.0}, "Input validation error: `top_p` must be > 0.0 and < 1.0"),
        ({"typical_p": 1.0}, "Input validation error: `typical_p` must be > 0.0 and < 1.0"),
        ({"top_k": 0}, "Input validation error: `top_k` must be strictly positive"),
        ({"max_new_tokens": 0}, "Input validation error: `max_new_tokens` must be strictly positive"),
        ({"stop": list("abcde")}, "Input validation error: `stop` supports up to 4 stop sequences. Given: 5"),
        ({"top_n_tokens": 10}, "Input validation error: `top_n_tokens` must be >= 0 and <= 5. Given: 10"),
        ({"best_of": 3, "do_sample": True}, "Input validation error: `best_of` must be > 0 and <= 2. Given: 3"),
        ({"best_of": 2}, "Input validation error: you must use sampling when `best_of` is > 1"),
        ({"best_of": 2, "do_sample": True, "seed": 1}, "`seed` must not be set when `best_of` > 1"),
        ({"truncate": 0}, "Input validation error: `truncate` must be strictly positive and less than 2047. Given: 0"),
        ({"grammar": {"type": "xml", "value": "a+"}}, "grammar"),
        ({"grammar": {"type": "json", "value": "{not json"}}, "Input validation error: grammar is not valid"),
        ({"grammar": {"type": "json", "value": "[1]"}}, "the schema must be a JSON object"),
        ({"grammar": {"type": "regex"}}, "missing field `parameters.grammar.regex.value`"),
        ({"watermark": True}, "Input validation error: `watermark` == true is not supported"),
        ({"adapter_id": "my-lora"}, "Input validation error: `adapter_id`: no adapter 'my-lora' is loaded"),
    ],
)
def test_tgi_parameter_checks(scripted, make_client, parameters, message):
    reply = make_client(scripted).post("/generate", json={"inputs": "hello", "parameters": parameters})
    assert message in _tgi_error(reply, 422)
    assert scripted.submitted == []


@pytest.mark.parametrize(
    "body, message",
    [
        ({}, "Failed to deserialize the JSON body into the target type: missing field `inputs`"),
        ({"inputs": 5}, "Failed to deserialize the JSON body into the target type: inputs:"),
        ({"inputs": "x", "parameters": {"max_new_tokens": "3"}}, "parameters.max_new_tokens"),
        ({"inputs": ""}, "Input validation error: `inputs` cannot be empty"),
        ({"inputs": "x", "parameters": {"max_new_token": 3}}, "unknown field `parameters.max_new_token`"),
        ({"inputs": "x", "stream_me": True}, "unknown field `stream_me`"),
        (["not", "an", "object"], "Failed to deserialize the JSON body into the target type"),
    ],
)
def test_tgi_body_errors(scripted, make_client, body, message):
    reply = make_client(scripted).post("/generate", json=body)
    assert message in _tgi_error(reply, 422)


@pytest.mark.parametrize(
    "raw", [b"{oops", b'{"inputs": "\\ud800"}', b'{"inputs": ' + b"[" * 100000 + b"]" * 100000 + b"}"]
)
def test_invalid_json_is_400_in_tgi_shape(scripted, make_client, raw):
    reply = make_client(scripted).post("/generate", data=raw, content_type="application/json")
    assert _tgi_error(reply, 400).startswith("Failed to parse the request body as JSON: ")


def test_streaming_refuses_best_of_and_decoder_input_details(scripted, make_client):
    client = make_client(scripted)
    body = {"inputs": "x", "parameters": {"best_of": 2, "do_sample": True}}
    assert "`best_of` != 1 is not supported when streaming tokens" in _tgi_error(
        client.post("/generate_stream", json=body), 422
    )
    body = {"inputs": "x", "parameters": {"decoder_input_details": True}}
    assert "`decoder_input_details` == true is not supported when streaming tokens" in _tgi_error(
        client.post("/", json={**body, "stream": True}), 422
    )
    assert scripted.submitted == []


def test_length_limits_use_tgi_messages(scripted, make_client, tokenizer):
    client = make_client(scripted.with_limits(20, 10))
    inputs = "word " * 30
    num = len(tokenizer.encode(inputs, add_special_tokens=True))
    message = _tgi_error(client.post("/generate", json={"inputs": inputs}), 422)
    assert message == f"Input validation error: `inputs` must have less than 10 tokens. Given: {num}"
    num = len(tokenizer.encode("hi", add_special_tokens=True))
    too_many = 20 - num + 1
    body = {"inputs": "hi", "parameters": {"max_new_tokens": too_many}}
    message = _tgi_error(client.post("/generate", json=body), 422)
    assert message == (
        f"Input validation error: `inputs` tokens + `max_new_tokens` must be <= 20. "
        f"Given: {num} `inputs` tokens and {too_many} `max_new_tokens`"
    )
    assert scripted.submitted == []


def test_truncate_keeps_the_last_prompt_tokens(scripted, make_client, tokenizer):
    client = make_client(scripted.with_limits(20, 10))
    inputs = "word " * 30
    reply = client.post("/generate", json={"inputs": inputs, "parameters": {"truncate": 5, "max_new_tokens": 3}})
    assert reply.status_code == 200, reply.data
    assert scripted.submitted[0].prompt_token_ids == tokenizer.encode(inputs, add_special_tokens=True)[-5:]


def test_overloaded_is_429_in_both_dialects(scripted, make_client):
    client = make_client(scripted, {"MAX_CONCURRENT_REQUESTS": "1"})
    held = client.post("/generate_stream", json={"inputs": "hi"}, buffered=False)  # holds the only slot
    assert held.status_code == 200
    assert _tgi_error(client.post("/generate", json={"inputs": "hi"}), 429, "overloaded") == "Model is overloaded"
    reply = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
    assert reply.status_code == 429 and reply.get_json()["error"]["code"] == "overloaded"
    held.close()  # the client goes away: its slot is free again
    assert client.post("/generate", json={"inputs": "hi"}).status_code == 200
    assert len(scripted.submitted) == 2


def test_api_key_on_tgi_routes(scripted, make_client):
    client = make_client(scripted, {"API_KEY": "k"})
    _tgi_error(client.post("/generate", json={"inputs": "hi"}), 401, "unauthorized")
    _tgi_error(client.post("/invocations", json={"inputs": "hi"}), 401, "unauthorized")
    ok = client.post("/generate", json={"inputs": "hi"}, headers={"Authorization": "bearer k"})
    assert ok.status_code == 200
    assert client.get("/health").status_code == 200 and client.get("/info").status_code == 200


@pytest.mark.parametrize("route", ["/generate", "/generate_stream", "/", "/tokenize", "/chat_tokenize"])
def test_a_form_post_is_415_naming_json(scripted, make_client, route):
    body = '{"inputs": "hi", "messages": [{"role": "user", "content": "hi"}]}'
    reply = make_client(scripted).post(route, data=body, content_type="application/x-www-form-urlencoded")
    assert "Content-Type: application/json" in _tgi_error(reply, 415)
    assert scripted.submitted == []


def test_invocations_takes_any_media_type(scripted, make_client):
    client = make_client(scripted)
    for content_type in ("application/x-www-form-urlencoded", "text/plain", "application/octet-stream"):
        body = '{"inputs": "hi", "parameters": {"max_new_tokens": 2}}'
        assert client.post("/invocations", data=body, content_type=content_type).status_code == 200
        reply = client.post("/endpoints/e/invocations", data=body, content_type=content_type)
        assert reply.status_code == 200, reply.data
    assert len(scripted.submitted) == 6
