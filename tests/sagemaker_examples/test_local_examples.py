"""The examples that need no AWS, run unchanged against the real server on loopback.

Greedy decoding (temperature 0) makes every path answer the same prompt with the same text, so each client path
is checked against the others: OpenAI client, boto3 InvokeEndpoint / InvokeEndpointWithResponseStream (the
server's SageMaker API routes), and the SageMaker SDK v2 in local mode and through boto3.
"""

from __future__ import annotations

import json

import pytest

from sagemaker_examples import invoke_boto3, openai_local, predict_sdk_v2

PROMPT = "What is deep learning?"
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def reference_text(live_server) -> str:
    """The greedy reply through the OpenAI example; the other paths must return exactly this."""
    with openai_local.make_client(f"{live_server.url}/v1", "-") as client:
        return openai_local.complete(client, openai_local.chat_kwargs(PROMPT, MAX_TOKENS, temperature=0))


# ---- SSE parsing of PayloadPart bytes (no server) ----------------------------------------------------------


def events(*payloads: dict) -> bytes:
    return b"".join(f"data: {json.dumps(p)}\n\n".encode() for p in payloads) + b"data: [DONE]\n\n"


@pytest.mark.parametrize("size", [1, 3, 7, 1000])
def test_sse_parser_rejoins_lines_split_across_payload_parts(size):
    raw = events({"n": 1, "s": "a\u00e9b"}, {"n": 2}) + b'data: {"after": "done"}\n\n'
    parts = [raw[i : i + size] for i in range(0, len(raw), size)]  # splits inside lines and inside UTF-8
    assert [json.loads(d) for d in invoke_boto3.iter_sse_data(parts)] == [{"n": 1, "s": "a\u00e9b"}, {"n": 2}]


def test_sse_parser_handles_crlf_comments_multiline_data_and_a_missing_last_blank_line():
    raw = b': keep-alive\r\n\r\ndata: {"a":\r\ndata: 1}\r\n\r\ndata:{"b": 2}'
    assert list(invoke_boto3.iter_sse_data([raw])) == ['{"a":\n1}', '{"b": 2}']


def test_chunk_text_reads_openai_and_tgi_events_and_raises_stream_errors():
    assert invoke_boto3.chunk_text({"choices": [{"index": 0, "delta": {"content": "Hi"}}]}) == "Hi"
    assert invoke_boto3.chunk_text({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}) == ""
    assert invoke_boto3.chunk_text({"token": {"id": 5, "text": " yes", "special": False}}) == " yes"
    assert invoke_boto3.chunk_text({"token": {"id": 2, "text": "</s>", "special": True}}) == ""
    with pytest.raises(RuntimeError, match="too long"):
        invoke_boto3.chunk_text({"error": {"message": "too long", "type": "validation"}})


def test_reply_text_reads_both_reply_shapes():
    assert invoke_boto3.reply_text({"choices": [{"message": {"content": "x"}}]}) == "x"
    assert predict_sdk_v2.reply_text([{"generated_text": "y"}]) == "y"


# ---- OpenAI client -----------------------------------------------------------------------------------------


def test_openai_example_streams_the_same_text(live_server, reference_text, capsys):
    assert reference_text, "the tiny model answered nothing; pick another prompt"
    code = openai_local.main(
        [
            "--base-url",
            f"{live_server.url}/v1",
            "--stream",
            "--temperature",
            "0",
            "--max-tokens",
            str(MAX_TOKENS),
            PROMPT,
        ]
    )
    assert code == 0
    assert capsys.readouterr().out == reference_text + "\n"


# ---- boto3 sagemaker-runtime against the server's /endpoints/<name>/... routes ------------------------------


def test_boto3_example_invoke_and_stream(live_server, reference_text, capsys):
    client = invoke_boto3.make_client(endpoint_url=live_server.url)
    body = invoke_boto3.chat_request(PROMPT, MAX_TOKENS, temperature=0)
    reply = invoke_boto3.invoke(client, invoke_boto3.invoke_args("my-llm", body))
    assert reply["object"] == "chat.completion"
    assert invoke_boto3.reply_text(reply) == reference_text

    code = invoke_boto3.main(
        [
            "--endpoint-url",
            live_server.url,
            "--endpoint-name",
            "my-llm",
            "--stream",
            "--temperature",
            "0",
            "--max-tokens",
            str(MAX_TOKENS),
            PROMPT,
        ]
    )
    assert code == 0
    assert capsys.readouterr().out == reference_text + "\n"


# ---- SageMaker SDK v2 --------------------------------------------------------------------------------------


def test_sdk_v2_local_mode_predict(live_server, reference_text, monkeypatch, capsys):
    import sagemaker.local.local_session as local_session

    # Local mode asks the docker CLI for the daemon's host on every request; the server already runs here.
    monkeypatch.setattr(local_session, "get_docker_host", lambda: "127.0.0.1")
    predictor = predict_sdk_v2.make_predictor("local", local_port=live_server.port)
    reply = predictor.predict(predict_sdk_v2.chat_request(PROMPT, MAX_TOKENS, temperature=0))
    assert reply["choices"][0]["message"]["role"] == "assistant"
    assert predict_sdk_v2.reply_text(reply) == reference_text

    code = predict_sdk_v2.main(
        ["--local", "--port", str(live_server.port), "--temperature", "0", "--max-tokens", str(MAX_TOKENS), PROMPT]
    )
    assert code == 0
    assert capsys.readouterr().out == reference_text + "\n"


def test_sdk_v2_endpoint_predict_stream_through_boto3(live_server, reference_text, monkeypatch, capsys):
    # botocore's per-service endpoint variable sends the SDK's real runtime client to the local server.
    monkeypatch.setenv("AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME", live_server.url)
    code = predict_sdk_v2.main(
        ["--endpoint-name", "my-llm", "--stream", "--temperature", "0", "--max-tokens", str(MAX_TOKENS), PROMPT]
    )
    assert code == 0
    assert capsys.readouterr().out == reference_text + "\n"
