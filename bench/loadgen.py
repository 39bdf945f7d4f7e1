"""Closed-loop load generator: N concurrent streaming POST /v1/chat/completions, timed per SSE chunk.

Stdlib asyncio only (one thread, raw HTTP/1.1) so the client costs little CPU on a small shared machine:
each of `concurrency` workers sends its next request as soon as its previous one ends.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

from bench.metrics import RequestResult

_READ_LIMIT = 1 << 20


async def _read_headers(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("server closed the connection before answering")
    status = int(status_line.split()[1])
    headers: dict[str, str] = {}
    while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers


async def _iter_body(reader: asyncio.StreamReader, headers: dict[str, str]):
    """Yield body pieces as they arrive: chunked, Content-Length, or read-until-close."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
            if size == 0:
                await reader.readline()  # the empty trailer line
                return
            piece = await reader.readexactly(size)
            await reader.readexactly(2)  # CRLF after each chunk
            yield piece
    elif "content-length" in headers:
        remaining = int(headers["content-length"])
        while remaining > 0:
            piece = await reader.read(min(remaining, 65536))
            if not piece:
                return
            remaining -= len(piece)
            yield piece
    else:
        while piece := await reader.read(65536):
            yield piece


def _apply_event(result: RequestResult, data: str, now: float) -> bool:
    """Fold one SSE `data:` payload into the result; True when the stream is over."""
    if data == "[DONE]":
        result.completed = True
        return True
    event = json.loads(data)
    if "error" in event:
        result.error = f"stream error: {json.dumps(event['error'])[:200]}"
        return True
    usage = event.get("usage")
    if usage and usage.get("completion_tokens") is not None:
        result.output_tokens = int(usage["completion_tokens"])
        result.prompt_tokens = usage.get("prompt_tokens")
        result.tokens_from_usage = True
    for choice in event.get("choices") or []:
        content = (choice.get("delta") or {}).get("content")
        if content:
            result.chunk_times.append(now)
            result.text += content
        if choice.get("finish_reason"):
            result.finish_reason = choice["finish_reason"]
            result.completed = True
    return False


async def stream_chat(url: str, body: dict[str, Any], timeout_s: float) -> RequestResult:
    """POST one streaming chat request and time every content chunk; never raises."""
    parts = urlsplit(url)
    payload = json.dumps(body).encode()
    request = (
        f"POST {parts.path or '/'} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
        f"Accept: text/event-stream\r\nContent-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
    ).encode() + payload
    result = RequestResult(start=time.perf_counter())
    writer: asyncio.StreamWriter | None = None

    async def exchange() -> None:
        nonlocal writer
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port, limit=_READ_LIMIT)
        writer.write(request)
        await writer.drain()
        status, headers = await _read_headers(reader)
        if status != 200:
            error_body = b"".join([piece async for piece in _iter_body(reader, headers)])
            result.error = f"HTTP {status}: {error_body[:300].decode(errors='replace')}"
        else:
            await _consume_sse(reader, headers, result)

    try:
        await asyncio.wait_for(exchange(), timeout_s)  # wait_for, not asyncio.timeout: Python 3.10 too
    except Exception as exc:  # a benchmark records failures instead of stopping
        result.error = result.error or f"{type(exc).__name__}: {exc}"
    finally:
        result.end = time.perf_counter()
        if writer is not None:
            writer.close()
    if result.error is None and not result.completed:
        result.error = f"stream ended without finish_reason or [DONE] after {len(result.chunk_times)} content chunks"
    return result


async def _consume_sse(reader: asyncio.StreamReader, headers: dict[str, str], result: RequestResult) -> None:
    buffer = b""
    async for piece in _iter_body(reader, headers):
        now = time.perf_counter()  # chunks that arrive in one read share an arrival time, as they did on the wire
        buffer = (buffer + piece).replace(b"\r\n", b"\n")  # on the joined bytes: a CRLF may straddle two reads
        while b"\n\n" in buffer:
            event, buffer = buffer.split(b"\n\n", 1)
            for line in event.decode().split("\n"):
                if line.startswith("data:") and _apply_event(result, line[5:].strip(), now):
                    return


async def run_load(
    url: str, bodies: Sequence[dict[str, Any]], concurrency: int, timeout_s: float = 600.0
) -> list[RequestResult]:
    """Send every body with at most `concurrency` in flight (closed loop); results in body order."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    results: list[RequestResult | None] = [None] * len(bodies)
    next_index = iter(range(len(bodies)))

    async def worker() -> None:
        for index in next_index:  # a shared iterator: each worker takes the next unsent body
            results[index] = await stream_chat(url, bodies[index], timeout_s)

    await asyncio.gather(*(worker() for _ in range(min(concurrency, len(bodies)))))
    return [r for r in results if r is not None]


def fill_token_counts(results: list[RequestResult], count_tokens: Callable[[str], int]) -> None:
    """Re-tokenize every streamed text; it is the output count where the server reported no usage."""
    for result in results:
        if result.error is None:
            result.retokenized_tokens = count_tokens(result.text)
            if result.output_tokens is None:
                result.output_tokens = result.retokenized_tokens


def run_load_sync(
    url: str, bodies: Sequence[dict[str, Any]], concurrency: int, timeout_s: float = 600.0
) -> list[RequestResult]:
    return asyncio.run(run_load(url, bodies, concurrency, timeout_s))
