"""Errors of the HTTP layer and how each dialect shows them.

One `ApiError` per failure; the route's dialect renders it: TGI's `{"error", "error_type"}` with TGI's status
codes, or OpenAI's `{"error": {"message", "type", "param", "code"}}` with OpenAI's.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Dialect(enum.Enum):
    TGI = "tgi"
    OPENAI = "openai"


class ErrorKind(enum.Enum):
    VALIDATION = "validation"
    BAD_JSON = "bad_json"
    INCOMPLETE_BODY = "incomplete_body"
    REQUEST_TIMEOUT = "request_timeout"
    CLIENT_GONE = "client_gone"
    DESERIALIZE = "deserialize"
    CONTEXT_LENGTH = "context_length"
    UNSUPPORTED = "unsupported"
    WRONG_SHAPE = "wrong_shape"
    TEMPLATE = "template"
    OVERLOADED = "overloaded"
    UNAUTHORIZED = "unauthorized"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    UNSUPPORTED_MEDIA = "unsupported_media"
    UNKNOWN_MODEL = "unknown_model"
    NOT_READY = "not_ready"
    GENERATION = "generation"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    INTERNAL = "internal"


@dataclass(frozen=True, slots=True)
class _Style:
    tgi_status: int
    tgi_type: str
    tgi_prefix: str
    openai_status: int
    openai_type: str
    openai_code: str | None = None


# TGI's codes and prefixes are from router/src/server.rs and validation.rs; OpenAI's from its API reference.
_STYLES: dict[ErrorKind, _Style] = {
    ErrorKind.VALIDATION: _Style(422, "validation", "Input validation error: ", 400, "invalid_request_error"),
    ErrorKind.BAD_JSON: _Style(
        400, "validation", "Failed to parse the request body as JSON: ", 400, "invalid_request_error", "invalid_json"
    ),
    ErrorKind.INCOMPLETE_BODY: _Style(
        400, "validation", "Incomplete request body: ", 400, "invalid_request_error", "incomplete_body"
    ),
    ErrorKind.REQUEST_TIMEOUT: _Style(408, "validation", "", 408, "invalid_request_error", "request_timeout"),
    # nginx's "client closed request": written to no one, but it is the status the request log shows.
    ErrorKind.CLIENT_GONE: _Style(499, "client_closed", "", 499, "invalid_request_error", "client_closed_request"),
    ErrorKind.DESERIALIZE: _Style(
        422, "validation", "Failed to deserialize the JSON body into the target type: ", 400, "invalid_request_error"
    ),
    ErrorKind.CONTEXT_LENGTH: _Style(
        422, "validation", "Input validation error: ", 400, "invalid_request_error", "context_length_exceeded"
    ),
    ErrorKind.UNSUPPORTED: _Style(
        422, "validation", "Input validation error: ", 400, "invalid_request_error", "unsupported_parameter"
    ),
    ErrorKind.WRONG_SHAPE: _Style(422, "validation", "", 422, "invalid_request_error", "unsupported_body_shape"),
    ErrorKind.TEMPLATE: _Style(
        422, "template_error", "Template error: ", 422, "invalid_request_error", "template_error"
    ),
    ErrorKind.OVERLOADED: _Style(429, "overloaded", "", 429, "rate_limit_error", "overloaded"),
    ErrorKind.UNAUTHORIZED: _Style(401, "unauthorized", "", 401, "invalid_request_error", "invalid_api_key"),
    ErrorKind.PAYLOAD_TOO_LARGE: _Style(
        413, "payload_too_large", "", 413, "invalid_request_error", "payload_too_large"
    ),
    ErrorKind.UNSUPPORTED_MEDIA: _Style(415, "validation", "", 415, "invalid_request_error", "unsupported_media_type"),
    ErrorKind.UNKNOWN_MODEL: _Style(
        422, "validation", "Input validation error: ", 400, "invalid_request_error", "model_not_found"
    ),
    ErrorKind.NOT_READY: _Style(503, "unhealthy", "", 503, "service_unavailable_error", "model_not_ready"),
    ErrorKind.GENERATION: _Style(
        424, "generation", "Request failed during generation: ", 500, "server_error", "generation_failed"
    ),
    ErrorKind.NOT_FOUND: _Style(404, "not_found", "", 404, "invalid_request_error", "not_found"),
    ErrorKind.METHOD_NOT_ALLOWED: _Style(405, "method_not_allowed", "", 405, "invalid_request_error", None),
    ErrorKind.INTERNAL: _Style(500, "internal", "", 500, "server_error", "internal_error"),
}


class ApiError(Exception):
    """A request that cannot be served, with what went wrong; `param` names the offending body field."""

    def __init__(self, kind: ErrorKind, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.param = param

    def status(self, dialect: Dialect) -> int:
        style = _STYLES[self.kind]
        return style.tgi_status if dialect is Dialect.TGI else style.openai_status

    def tgi_body(self) -> dict:
        style = _STYLES[self.kind]
        return {"error": style.tgi_prefix + self.message, "error_type": style.tgi_type}

    def openai_body(self) -> dict:
        style = _STYLES[self.kind]
        return {
            "error": {
                "message": self.message,
                "type": style.openai_type,
                "param": self.param,
                "code": style.openai_code,
            }
        }

    def body(self, dialect: Dialect) -> dict:
        return self.tgi_body() if dialect is Dialect.TGI else self.openai_body()


def validation(message: str, param: str | None = None) -> ApiError:
    return ApiError(ErrorKind.VALIDATION, message, param)


def unsupported(message: str, param: str | None = None) -> ApiError:
    return ApiError(ErrorKind.UNSUPPORTED, message, param)


UNHEALTHY_BODY = {"error": "unhealthy", "error_type": "healthcheck"}
"""What TGI's /health and /ping answer with 503."""
