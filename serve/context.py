"""Per-request helpers the route modules share: this worker's state, the request record, the JSON body."""

from __future__ import annotations

import json
import re

import gevent
from flask import Response, current_app, g, request
from werkzeug.exceptions import ClientDisconnected

from serve.connections import close_after_reply, waiting_for_body
from serve.errors import ApiError, Dialect, ErrorKind
from serve.logging_setup import RequestRecord
from serve.state import ServeState
from serve.streaming import dumps


def current_state() -> ServeState:
    return current_app.extensions["serve"]


def current_record() -> RequestRecord:
    return g.record


def set_dialect(dialect: Dialect) -> None:
    """Errors from here on are shown in this dialect (set once the body's shape is known)."""
    g.dialect = dialect
    g.record.dialect = dialect.value


def current_dialect() -> Dialect:
    return getattr(g, "dialect", Dialect.TGI)


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
"""A JSON escape in U+D800-U+DFFF: a surrogate, paired (one character once decoded) or lone (no character)."""
_TOO_DEEP = "recursion limit exceeded: the JSON nests too deeply"


def is_json_media_type(content_type: str | None) -> bool:
    """No Content-Type at all, `application/json` or a `+json` type (parameters such as charset aside)."""
    media_type = (content_type or "").split(";", 1)[0].strip().lower()
    return media_type in ("", "application/json") or (
        media_type.startswith("application/") and media_type.endswith("+json")
    )


def read_json(any_media_type: bool = False) -> object:
    """The decoded body. Its Content-Type must say JSON or be absent (TGI's axum answers 415 otherwise: a form
    post such as `curl -d` without a header must not pass as JSON); `/invocations` takes any (SageMaker clients
    send all kinds).

    Rejected as unparsable, like serde (TGI) does: invalid UTF-8, a lone surrogate escape (a string no
    tokenizer or UTF-8 reply can hold), nesting deeper than the parser's recursion limit.
    """
    if not any_media_type and not is_json_media_type(request.headers.get("Content-Type")):
        raise ApiError(
            ErrorKind.UNSUPPORTED_MEDIA,
            f"Expected request with `Content-Type: application/json`, got {request.headers['Content-Type']!r}",
        )
    data = read_body()
    try:
        body = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(ErrorKind.BAD_JSON, str(exc)) from None
    except RecursionError:
        raise ApiError(ErrorKind.BAD_JSON, _TOO_DEEP) from None
    if _SURROGATE_ESCAPE.search(data):  # rare (escaped emoji): then check that every string is valid UTF-8
        try:
            json.dumps(body, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(ErrorKind.BAD_JSON, "lone surrogate in a string's \\u escape: not valid Unicode") from None
        except RecursionError:
            raise ApiError(ErrorKind.BAD_JSON, _TOO_DEEP) from None
    return body


class _BodyTimeout(Exception):
    pass


def read_body() -> bytes:
    """The whole request body, or an error before anything is parsed or queued: 408 when it does not arrive
    within REQUEST_READ_TIMEOUT, 400 when the client closed the connection before sending all of it (shorter
    than its Content-Length, or a chunked body cut off). Meanwhile the connection counts as waiting on its
    client, so a worker full of them closes the oldest to take new connections (serve/connections.py)."""
    timeout_s = current_state().settings.request_read_timeout_s
    try:
        with waiting_for_body(request.environ), gevent.Timeout(timeout_s, _BodyTimeout):
            data = request.get_data(cache=True)
    except _BodyTimeout:
        close_after_reply(request.environ)
        message = f"the request body did not arrive within REQUEST_READ_TIMEOUT ({timeout_s:g} s)"
        raise ApiError(ErrorKind.REQUEST_TIMEOUT, message) from None
    except ClientDisconnected:  # werkzeug's word for the server's reader failing on a cut chunked body
        close_after_reply(request.environ)
        raise ApiError(ErrorKind.INCOMPLETE_BODY, "the connection closed before the chunked body ended") from None
    expected = request.content_length
    if expected is not None and len(data) != expected:
        close_after_reply(request.environ)
        message = f"Content-Length says {expected} bytes but the connection closed after {len(data)}"
        raise ApiError(ErrorKind.INCOMPLETE_BODY, message)
    return data


def json_response(body: object, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(dumps(body), status=status, content_type="application/json", headers=headers)


def error_response(error: ApiError, dialect: Dialect | None = None) -> Response:
    """An error as JSON in the route's dialect, with that dialect's status code."""
    dialect = dialect or current_dialect()
    if hasattr(g, "record"):
        g.record.error, g.record.error_kind = error.message, error.kind.value
    return json_response(error.body(dialect), status=error.status(dialect))
