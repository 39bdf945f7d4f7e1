"""/invocations: MESSAGES_API_ENABLED picks the accepted body; unset, the body's shape does; streams work too.

Replies come from the real engine; the scripted one only spies on what reaches the seam (nothing, for a bad body;
the inference id, in the engine request id)."""

from __future__ import annotations

import json

import pytest

from tests.openai_schema import validate

CHAT_BODY = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}
TGI_BODY = {"inputs": "hi", "parameters": {"max_new_tokens": 4}}  # with parameters and no do_sample: greedy
COMPLETION_BODY = {"prompt": "hi", "max_tokens": 4, "temperature": 0}


def _generated(client) -> str:
    """The real engine's greedy continuation of "hi" (4 tokens), learned through /generate."""
    text = client.post("/generate", json=TGI_BODY).get_json()["generated_text"]
    assert text
    return text


def test_unset_dispatches_by_shape(live_client):
    client = live_client()
    generated = _generated(client)
    chat = client.post("/invocations", json=CHAT_BODY).get_json()
    validate(chat, "CreateChatCompletionResponse")
    assert chat["object"] == "chat.completion"
    tgi = client.post("/invocations", json=TGI_BODY).get_json()
    # TGI's /invocations: a one-element list, the prompt prepended (return_full_text defaults to true there).
    assert tgi == [{"generated_text": "hi" + generated}]
    completion = client.post("/invocations", json=COMPLETION_BODY).get_json()
    validate(completion, "CreateCompletionResponse")
    assert completion["choices"][0]["text"] == generated  # the same prompt tokens as TGI's: the same greedy text


def test_return_full_text_false_and_generate_default(live_client):
    client = live_client()
    generated = _generated(client)
    body = {"inputs": "hi", "parameters": {"max_new_tokens": 4, "return_full_text": False}}
    assert client.post("/invocations", json=body).get_json() == [{"generated_text": generated}]
    assert client.post("/", json=TGI_BODY).get_json() == [{"generated_text": "hi" + generated}]


def test_messages_api_enabled_true_rejects_tgi_bodies(live_client):
    client = live_client({"MESSAGES_API_ENABLED": "true"})
    reply = client.post("/invocations", json=TGI_BODY)
    assert reply.status_code == 422
    assert "MESSAGES_API_ENABLED" in reply.get_json()["error"] and reply.get_json()["error_type"] == "validation"
    reply = client.post("/invocations", json=COMPLETION_BODY)
    assert reply.status_code == 422 and "MESSAGES_API_ENABLED" in reply.get_json()["error"]["message"]
    assert client.post("/invocations", json=CHAT_BODY).get_json()["object"] == "chat.completion"


def test_messages_api_enabled_false_rejects_chat_bodies(live_client):
    client = live_client({"MESSAGES_API_ENABLED": "false"})
    reply = client.post("/invocations", json=CHAT_BODY)
    assert reply.status_code == 422
    error = reply.get_json()["error"]
    validate(reply.get_json(), "ErrorResponse")
    assert "MESSAGES_API_ENABLED" in error["message"]
    assert client.post("/invocations", json=TGI_BODY).get_json() == [{"generated_text": "hi" + _generated(client)}]


@pytest.mark.parametrize("body", [{}, {"text": "hi"}, [1, 2], "just a string"])
def test_unknown_shapes_are_422(scripted, make_client, body):
    reply = make_client(scripted).post("/invocations", json=body)
    assert reply.status_code == 422 and "MESSAGES_API_ENABLED" in reply.get_json()["error"]
    assert scripted.submitted == []


def test_streaming_through_invocations(live_client):
    client = live_client()
    generated = _generated(client)
    chat = client.post("/invocations", json={**CHAT_BODY, "stream": True})
    assert chat.headers["Content-Type"] == "text/event-stream"
    frames = chat.get_data(as_text=True).split("\n\n")
    assert frames[-2:] == ["data: [DONE]", ""]
    for frame in frames[:-2]:
        validate(json.loads(frame.removeprefix("data: ")), "CreateChatCompletionStreamResponse")
    tgi = client.post("/invocations", json={**TGI_BODY, "stream": True}).get_data(as_text=True)
    events = [json.loads(f.removeprefix("data: ")) for f in tgi.split("\n\n") if f]
    assert [e["index"] for e in events] == [1, 2, 3, 4] and "[DONE]" not in tgi
    assert events[-1]["generated_text"] == "hi" + generated


def test_sagemaker_headers_are_accepted_and_the_inference_id_is_echoed(scripted, make_client):
    headers = {
        "X-Amzn-SageMaker-Custom-Attributes": "trace=1",
        "X-Amzn-SageMaker-Target-Model": "model.tar.gz",
        "X-Amzn-SageMaker-Inference-Id": "inf-1",
        "X-Amzn-SageMaker-Target-Variant": "AllTraffic",
        "X-Some-Unknown-Header": "ignored",
    }
    reply = make_client(scripted).post("/invocations", json=CHAT_BODY, headers=headers)
    assert reply.status_code == 200 and reply.headers["X-Request-Id"] == "inf-1"
    assert scripted.submitted[0].request_id.startswith("inf-1-")
