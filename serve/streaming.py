"""Server-sent events: the frames, the response that carries them, and cleanup when a client goes away.

Frames are exactly `data: <compact json>\\n\\n`; OpenAI streams end with `data: [DONE]\\n\\n`, TGI's do not.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from flask import Response

from serve.errors import ApiError, Dialect, ErrorKind

if TYPE_CHECKING:
    from serve.state import Job

logger = logging.getLogger("serve.streaming")

SSE_CONTENT_TYPE = "text/event-stream"
SSE_DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def dumps(obj: Any) -> str:
    """Compact JSON with raw UTF-8, as TGI (serde) writes it."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def sse_data(obj: Any) -> bytes:
    return f"data: {dumps(obj)}\n\n".encode()


def guarded_events(job: Job, events: Iterator[bytes], dialect: Dialect) -> Iterator[bytes]:
    """A stream's events, any failure turned into the dialect's error event, the job released however it ends.

    The status line went out with the first event, so an error can only travel in the stream: OpenAI's
    `{"error": {...}}` then `[DONE]`, TGI's `{"error", "error_type"}`. Event builders raise ApiError for
    failures they detect (an engine error on a sequence, a stream that ended without tokens).
    """
    try:
        yield from events
    except GeneratorExit:  # the server closed the body unfinished: the client left (a write to it failed)
        job.abandoned = True
        if job.record.error_kind is None:
            job.record.error, job.record.error_kind = "the client left mid-stream", ErrorKind.CLIENT_GONE.value
        raise
    except ApiError as error:
        yield from _error_events(job, error, dialect)
    except Exception as exc:
        logger.exception("stream failed", extra={"request_id": job.record.request_id})
        yield from _error_events(job, ApiError(ErrorKind.INTERNAL, f"{type(exc).__name__}: {exc}"), dialect)
    finally:
        job.close()


def _error_events(job: Job, error: ApiError, dialect: Dialect) -> Iterator[bytes]:
    job.record.error, job.record.error_kind = error.message, error.kind.value
    yield sse_data(error.body(dialect))
    if dialect is Dialect.OPENAI:
        yield SSE_DONE


class ClosingStream:
    """A response body that runs `on_close` exactly once, however it ends: finished, failed or abandoned.

    A generator's `finally` does not run if the client leaves before the first chunk, so the engine
    requests are released here too (the WSGI server calls `close()` on every response body).
    """

    def __init__(self, chunks: Iterable[bytes], on_close: Callable[[], None]) -> None:
        self._chunks = iter(chunks)
        self._on_close: Callable[[], None] | None = on_close

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        return next(self._chunks)

    def close(self) -> None:
        close = getattr(self._chunks, "close", None)
        try:
            if close is not None:
                close()
        finally:
            on_close, self._on_close = self._on_close, None
            if on_close is not None:
                on_close()


def sse_response(
    chunks: Iterable[bytes], on_close: Callable[[], None], headers: dict[str, str] | None = None
) -> Response:
    """An SSE reply; `on_close` runs when the body is finished or abandoned (frees the engine requests)."""
    return Response(
        ClosingStream(chunks, on_close),
        status=200,
        content_type=SSE_CONTENT_TYPE,
        headers={**SSE_HEADERS, **(headers or {})},
    )
