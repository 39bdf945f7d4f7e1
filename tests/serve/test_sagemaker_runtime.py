"""The local SageMaker runtime routes, driven by boto3's own sagemaker-runtime client over loopback HTTP."""

from __future__ import annotations

import json
import threading

import boto3
import pytest
from botocore.config import Config
from werkzeug.serving import make_server

from serve.app import create_app
from serve.settings import Settings

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


@pytest.fixture()
def runtime(scripted):
    """A real HTTP server (werkzeug, threaded) around the app, and a boto3 client pointed at it."""
    app = create_app(Settings(), scripted)
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    client = boto3.client(
        "sagemaker-runtime",
        endpoint_url=f"http://127.0.0.1:{server.server_port}",
        region_name="us-east-1",
        aws_access_key_id="x",
        aws_secret_access_key="x",
        config=Config(retries={"max_attempts": 1}),
    )
    yield client
    server.shutdown()
    thread.join(5)


def test_invoke_endpoint_chat_and_tgi(runtime):
    reply = runtime.invoke_endpoint(
        EndpointName="my-ep", Body=json.dumps(CHAT), ContentType="application/json", InferenceId="inf-7"
    )
    assert reply["ContentType"] == "application/json"
    body = json.loads(reply["Body"].read())
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["content"] == "Hello world"
    assert reply["InvokedProductionVariant"] == "AllTraffic"
    reply = runtime.invoke_endpoint(EndpointName="my-ep", Body=json.dumps({"inputs": "hi"}))
    assert json.loads(reply["Body"].read()) == [{"generated_text": "hiHello world! This is a test."}]


def test_invoke_endpoint_with_response_stream(runtime):
    reply = runtime.invoke_endpoint_with_response_stream(
        EndpointName="my-ep", Body=json.dumps({**CHAT, "stream": True}), ContentType="application/json"
    )
    assert reply["ContentType"] == "text/event-stream"
    parts = [event["PayloadPart"]["Bytes"] for event in reply["Body"]]
    raw = b"".join(parts)
    frames = [f for f in raw.decode().split("\n\n") if f]
    assert frames[-1] == "data: [DONE]" and all(p.endswith(b"\n\n") for p in parts)
    chunks = [json.loads(f.removeprefix("data: ")) for f in frames[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == "Hello world"


def test_container_errors_become_model_errors(runtime):
    with pytest.raises(runtime.exceptions.ModelError) as caught:
        runtime.invoke_endpoint(EndpointName="my-ep", Body=json.dumps({"inputs": "hi", "parameters": {"top_p": 1.0}}))
    error = caught.value.response
    assert error["Error"]["Code"] == "ModelError"
    assert error["OriginalStatusCode"] == 422
    assert "`top_p` must be > 0.0 and < 1.0" in error["OriginalMessage"]
    with pytest.raises(runtime.exceptions.ModelError):
        runtime.invoke_endpoint_with_response_stream(EndpointName="my-ep", Body=json.dumps({"nothing": 1}))


def test_sagemaker_sdk_predict_stream(runtime, monkeypatch):
    monkeypatch.setenv("SAGEMAKER_SUPPRESS_V2_WARNING", "1")
    import sagemaker
    from sagemaker.huggingface import HuggingFacePredictor
    from sagemaker.iterators import LineIterator

    session = sagemaker.Session(
        boto_session=boto3.Session(region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x"),
        sagemaker_runtime_client=runtime,
    )
    predictor = HuggingFacePredictor("my-ep", sagemaker_session=session)
    assert predictor.predict({"inputs": "hi", "parameters": {"max_new_tokens": 2}}) == [{"generated_text": "hiHe"}]
    lines = [line for line in predictor.predict_stream({**CHAT, "stream": True}, iterator=LineIterator) if line]
    assert lines[-1] == b"data: [DONE]"
    text = "".join(
        c["choices"][0]["delta"].get("content", "")
        for c in (json.loads(line[len(b"data: ") :]) for line in lines[:-1])
        if c["choices"]
    )
    assert text == "Hello world"
