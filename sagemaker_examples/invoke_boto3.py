"""Call an endpoint with plain boto3: InvokeEndpoint for one JSON reply, InvokeEndpointWithResponseStream for SSE.

The streaming reply arrives as PayloadPart events whose bytes are pieces of the container's SSE stream; a piece can
end in the middle of a line, so the bytes are re-buffered into lines before the `data:` events are parsed.

    python invoke_boto3.py --endpoint-name my-llm "What is deep learning?"            # one reply
    python invoke_boto3.py --endpoint-name my-llm --stream "What is deep learning?"   # token by token
    # against the container on this machine (it also serves the SageMaker API paths):
    python invoke_boto3.py --endpoint-url http://localhost:8080 --stream "Hello"
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable, Iterator
from typing import Any


def chat_request(prompt: str, max_tokens: int = 256, temperature: float | None = None, stream: bool = False) -> dict:
    """The Messages API body (TGI's /invocations takes OpenAI's chat shape when it has `messages`)."""
    body: dict[str, Any] = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens}
    if temperature is not None:
        body["temperature"] = temperature
    if stream:
        body["stream"] = True
    return body


def invoke_args(endpoint_name: str, body: dict, stream: bool = False) -> dict:
    """Keyword arguments for `invoke_endpoint` / `invoke_endpoint_with_response_stream`."""
    args = {"EndpointName": endpoint_name, "ContentType": "application/json", "Body": json.dumps(body).encode()}
    args["Accept"] = "text/event-stream" if stream else "application/json"
    return args


def make_client(region: str | None = None, endpoint_url: str | None = None):
    """A sagemaker-runtime client; `endpoint_url` points it at a local container instead of AWS."""
    import boto3

    if endpoint_url is None:
        return boto3.client("sagemaker-runtime", region_name=region)
    # A local container checks no signature, but botocore still signs: any credentials will do.
    return boto3.client(
        "sagemaker-runtime",
        region_name=region or "us-east-1",
        endpoint_url=endpoint_url,
        aws_access_key_id=os.environ.get("AWS_ACCESS_KEY_ID", "local"),
        aws_secret_access_key=os.environ.get("AWS_SECRET_ACCESS_KEY", "local"),
    )


def invoke(client, args: dict) -> dict:
    """Send one request; return the decoded JSON reply."""
    response = client.invoke_endpoint(**args)
    return json.loads(response["Body"].read())


def iter_payload_bytes(event_stream: Iterable[dict]) -> Iterator[bytes]:
    """The raw bytes of each PayloadPart event (error events raise inside botocore's iterator)."""
    for event in event_stream:
        if "PayloadPart" in event:
            yield event["PayloadPart"]["Bytes"]


def iter_sse_data(chunks: Iterable[bytes]) -> Iterator[str]:
    """Server-sent events from arbitrarily split byte chunks: yields each event's `data` (lines joined by \\n).

    Ends at `data: [DONE]` or when the chunks run out; `\\r\\n` line ends and comment lines are accepted.
    """
    buffer = b""
    data_lines: list[str] = []
    for chunk in chunks:
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for raw in lines:
            line = raw.rstrip(b"\r").decode("utf-8")
            if line == "":
                if data_lines:
                    data = "\n".join(data_lines)
                    data_lines = []
                    if data == "[DONE]":
                        return
                    yield data
            elif line.startswith("data:"):
                data_lines.append(line[5:].removeprefix(" "))
    if buffer.strip().startswith(b"data:"):  # a last event without its blank line
        data_lines.append(buffer.strip().decode("utf-8")[5:].removeprefix(" "))
    if data_lines and "\n".join(data_lines) != "[DONE]":
        yield "\n".join(data_lines)


def chunk_text(event: dict) -> str:
    """The new text in one streamed event: an OpenAI chat chunk or a TGI token event."""
    if "error" in event:
        error = event["error"]
        raise RuntimeError(error.get("message", error) if isinstance(error, dict) else error)
    if event.get("choices"):
        return event["choices"][0].get("delta", {}).get("content") or ""
    token = event.get("token")
    if token and not token.get("special"):
        return token.get("text", "")
    return ""


def stream_text(client, args: dict) -> Iterator[str]:
    """Send a streaming request; yield the reply's text piece by piece."""
    response = client.invoke_endpoint_with_response_stream(**args)
    for data in iter_sse_data(iter_payload_bytes(response["Body"])):
        yield chunk_text(json.loads(data))


def reply_text(reply: Any) -> str:
    """The text of a non-streamed reply: OpenAI chat completion or TGI `[{"generated_text": ...}]`."""
    if isinstance(reply, list):
        reply = reply[0]
    if "choices" in reply:
        return reply["choices"][0]["message"]["content"] or ""
    return reply["generated_text"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompt", nargs="?", default="What is deep learning?")
    parser.add_argument("--endpoint-name", default=os.environ.get("ENDPOINT_NAME", "local"))
    parser.add_argument(
        "--endpoint-url",
        default=os.environ.get("SAGEMAKER_RUNTIME_URL"),
        help="e.g. http://localhost:8080 for a local container (default: AWS)",
    )
    parser.add_argument("--region", default=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"))
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--stream", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    client = make_client(args.region, args.endpoint_url)
    body = chat_request(args.prompt, args.max_tokens, args.temperature, stream=args.stream)
    request = invoke_args(args.endpoint_name, body, stream=args.stream)
    if args.stream:
        for piece in stream_text(client, request):
            print(piece, end="", flush=True)
        print()
    else:
        print(reply_text(invoke(client, request)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
