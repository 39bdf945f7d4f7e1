"""Talk to the container with the official OpenAI client: it serves OpenAI's Chat Completions API under /v1.

Start the container first (container/local_test/serve_local.sh), then:

    python openai_local.py "Write a haiku about GPUs."            # one reply
    python openai_local.py --stream "Write a haiku about GPUs."   # token by token
    python openai_local.py --base-url http://localhost:8080/v1 --api-key "$API_KEY" "Hi"
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from typing import Any


def make_client(base_url: str, api_key: str):
    from openai import OpenAI

    # The server accepts any model name; the key only matters when the container was started with API_KEY.
    return OpenAI(base_url=base_url, api_key=api_key, max_retries=0)


def chat_kwargs(
    prompt: str,
    max_tokens: int = 256,
    temperature: float | None = None,
    stream: bool = False,
    system: str | None = None,
) -> dict[str, Any]:
    """Arguments for `client.chat.completions.create`."""
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": prompt})
    kwargs: dict[str, Any] = {"model": "tgi", "messages": messages, "max_tokens": max_tokens}
    if temperature is not None:
        kwargs["temperature"] = temperature
    if stream:
        kwargs["stream"] = True
        kwargs["stream_options"] = {"include_usage": True}
    return kwargs


def complete(client, kwargs: dict[str, Any]) -> str:
    completion = client.chat.completions.create(**kwargs)
    return completion.choices[0].message.content or ""


def stream(client, kwargs: dict[str, Any]) -> Iterator[str]:
    for chunk in client.chat.completions.create(**kwargs):
        if chunk.choices and chunk.choices[0].delta.content:
            yield chunk.choices[0].delta.content


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompt", nargs="?", default="What is deep learning?")
    parser.add_argument("--base-url", default=os.environ.get("OPENAI_BASE_URL", "http://localhost:8080/v1"))
    parser.add_argument("--api-key", default=os.environ.get("API_KEY", "-"))
    parser.add_argument("--system")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--stream", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    kwargs = chat_kwargs(args.prompt, args.max_tokens, args.temperature, args.stream, args.system)
    with make_client(args.base_url, args.api_key) as client:
        if args.stream:
            for piece in stream(client, kwargs):
                print(piece, end="", flush=True)
            print()
        else:
            print(complete(client, kwargs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
