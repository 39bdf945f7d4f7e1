"""Chat with an endpoint through the SageMaker Python SDK v2 (`pip install 'sagemaker<3'`): HuggingFacePredictor.

    python predict_sdk_v2.py --endpoint-name my-llm "What is deep learning?"
    python predict_sdk_v2.py --endpoint-name my-llm --stream "What is deep learning?"
    # local mode: the container already runs on this machine (container/local_test/serve_local.sh)
    python predict_sdk_v2.py --local --port 8080 "What is deep learning?"

Local mode has no streaming: the SDK's local runtime client lacks InvokeEndpointWithResponseStream.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from typing import Any

os.environ.setdefault("SAGEMAKER_SUPPRESS_V2_WARNING", "1")


def chat_request(
    prompt: str, max_tokens: int = 256, temperature: float | None = None, system: str | None = None
) -> dict:
    """What `predictor.predict()` sends: TGI's Messages API body on /invocations."""
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": prompt})
    body: dict[str, Any] = {"messages": messages, "max_tokens": max_tokens}
    if temperature is not None:
        body["temperature"] = temperature
    return body


def make_predictor(endpoint_name: str, region: str | None = None, local_port: int | None = None):
    """A HuggingFacePredictor (JSON in, JSON out) for a real endpoint, or for a local container on `local_port`."""
    import boto3
    from sagemaker.huggingface import HuggingFacePredictor

    if local_port is None:
        import sagemaker

        session = sagemaker.Session(boto_session=boto3.Session(region_name=region))
        return HuggingFacePredictor(endpoint_name, sagemaker_session=session)
    from sagemaker.local import LocalSession

    # Local mode needs a region but no credentials; it POSTs to http://<docker host>:<serving_port>/invocations.
    session = LocalSession(boto_session=boto3.Session(region_name=region or "us-east-1"))
    session.config = {"local": {"serving_port": local_port}}
    return HuggingFacePredictor(endpoint_name, sagemaker_session=session)


def reply_text(reply: Any) -> str:
    """The text of a reply: OpenAI chat completion or TGI `[{"generated_text": ...}]`."""
    if isinstance(reply, list):
        reply = reply[0]
    if "choices" in reply:
        return reply["choices"][0]["message"]["content"] or ""
    return reply["generated_text"]


def stream_text(predictor, body: dict) -> Iterator[str]:
    """Streamed text through `predict_stream` (real endpoints only); LineIterator re-joins split lines."""
    from sagemaker.iterators import LineIterator

    for line in predictor.predict_stream({**body, "stream": True}, iterator=LineIterator):
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            return
        event = json.loads(data)
        if "error" in event:
            raise RuntimeError(event["error"])
        if event.get("choices"):
            yield event["choices"][0]["delta"].get("content") or ""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompt", nargs="?", default="What is deep learning?")
    parser.add_argument("--endpoint-name", default=os.environ.get("ENDPOINT_NAME", "local"))
    parser.add_argument("--region", default=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"))
    parser.add_argument("--local", action="store_true", help="use SageMaker local mode against localhost")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8080")))
    parser.add_argument("--system")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--stream", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    predictor = make_predictor(args.endpoint_name, args.region, args.port if args.local else None)
    body = chat_request(args.prompt, args.max_tokens, args.temperature, args.system)
    if args.stream:
        for piece in stream_text(predictor, body):
            print(piece, end="", flush=True)
        print()
    else:
        print(reply_text(predictor.predict(body)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
