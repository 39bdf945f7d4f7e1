"""Helpers for the route tests: reading SSE replies, and waiting until the real engine is idle again."""

from __future__ import annotations

import json

import gevent

from tests.openai_schema import validate


def sse_frames(reply) -> list[str]:
    """The `data:` payloads of an SSE reply, in order."""
    raw = reply.get_data(as_text=True)
    assert raw.endswith("\n\n")
    return [frame.removeprefix("data: ") for frame in raw.split("\n\n") if frame]


def openai_chunks(reply, schema: str = "CreateChatCompletionStreamResponse") -> list[dict]:
    """The JSON chunks of an OpenAI stream (which must end with [DONE]); all but error events match `schema`."""
    frames = sse_frames(reply)
    assert frames[-1] == "[DONE]"
    chunks = [json.loads(f) for f in frames[:-1]]
    for chunk in chunks:
        if "error" not in chunk:
            validate(chunk, schema)
    return chunks


def wait_idle(engine, timeout_s: float = 8.0) -> None:
    """Wait (cooperatively: the engine client reads in a greenlet) until the engine runs nothing and every KV
    block is free again.

    Only heartbeats that arrive after the call count, two of them: an older one may predate the requests
    the test just made, and the first new one may still carry the status of the step before.
    """
    seen = engine.last_heartbeat
    num_fresh = 0
    for _ in range(int(timeout_s / 0.05)):
        heartbeat = engine.last_heartbeat
        if heartbeat is not seen:
            seen, num_fresh = heartbeat, num_fresh + 1
            idle = heartbeat.num_running == 0 and heartbeat.num_waiting == 0
            if num_fresh >= 2 and idle and heartbeat.num_free_blocks == engine.info.num_kv_blocks:
                return
        gevent.sleep(0.05)
    raise AssertionError(f"engine still busy or holding KV blocks: {engine.last_heartbeat}")
