"""The Flask app factory: routes, API key, body limit, CORS, request ids, JSON errors, one log line per request.

`create_app(settings, engine_client)`: tests pass their own client; without one, each worker creates the
real one lazily (after gunicorn's fork) from `settings.engine_address`.
"""

from __future__ import annotations

import hmac
import logging
import time
import uuid

from flask import Flask, Response, g, request
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound, RequestEntityTooLarge

from serve import routes, routes_docs, routes_openai, routes_sagemaker, routes_tgi
from serve.context import current_dialect, error_response
from serve.errors import ApiError, Dialect, ErrorKind
from serve.logging_setup import RequestRecord, log_request
from serve.settings import Settings
from serve.state import ServeState

logger = logging.getLogger("serve.app")

_REQUEST_ID_HEADERS = ("X-Amzn-SageMaker-Inference-Id", "X-Request-Id")
_FAILURE_KIND = {
    ErrorKind.OVERLOADED: "overloaded",
    ErrorKind.TEMPLATE: "template",
    ErrorKind.GENERATION: "generation",
    ErrorKind.INTERNAL: "generation",
    ErrorKind.NOT_READY: "generation",
    ErrorKind.CLIENT_GONE: "client_gone",
}


def create_app(settings: Settings, engine_client=None) -> Flask:
    app = Flask("serve", static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = settings.payload_limit
    state = ServeState(settings, engine_client)
    app.extensions["serve"] = state
    for module in (routes, routes_openai, routes_tgi, routes_sagemaker, routes_docs):
        app.register_blueprint(module.blueprint)

    @app.before_request
    def start_request() -> Response | None:
        request_id = next((request.headers[h] for h in _REQUEST_ID_HEADERS if request.headers.get(h)), None)
        g.record = RequestRecord(
            request_id=(request_id or uuid.uuid4().hex)[:128],
            method=request.method,
            route=request.path,
            inference_id=request.headers.get("X-Amzn-SageMaker-Inference-Id"),
            target_model=request.headers.get("X-Amzn-SageMaker-Target-Model"),
        )
        g.dialect = Dialect.OPENAI if request.path.startswith("/v1/") else Dialect.TGI
        if request.method == "OPTIONS" and settings.cors_allow_origins:
            return Response(status=204)
        if settings.api_key and request.endpoint not in routes.PUBLIC_ENDPOINTS and request.endpoint is not None:
            if not _authorized(request.headers.get("Authorization", ""), settings.api_key):
                message = "Invalid or missing API key: send Authorization: Bearer <API_KEY>"
                return error_response(ApiError(ErrorKind.UNAUTHORIZED, message))
        return None

    @app.after_request
    def finish_request(response: Response) -> Response:
        record: RequestRecord = g.record
        record.status = response.status_code
        response.headers["X-Request-Id"] = record.request_id
        if settings.cors_allow_origins:
            _add_cors_headers(response, settings.cors_allow_origins)
        response.call_on_close(lambda: _on_closed(state, record))
        return response

    @app.errorhandler(ApiError)
    def on_api_error(error: ApiError) -> Response:
        return error_response(error)

    @app.errorhandler(HTTPException)
    def on_http_error(error: HTTPException) -> Response:
        if isinstance(error, RequestEntityTooLarge):
            message = f"The request body is larger than PAYLOAD_LIMIT ({settings.payload_limit} bytes)"
            return error_response(ApiError(ErrorKind.PAYLOAD_TOO_LARGE, message))
        if isinstance(error, NotFound):
            return error_response(ApiError(ErrorKind.NOT_FOUND, f"No route {request.method} {request.path}"))
        if isinstance(error, MethodNotAllowed):
            message = f"Method {request.method} is not allowed on {request.path}"
            return error_response(ApiError(ErrorKind.METHOD_NOT_ALLOWED, message))
        code = error.code or 500
        response = error_response(ApiError(ErrorKind.VALIDATION if code < 500 else ErrorKind.INTERNAL, str(error)))
        response.status_code = code
        return response

    @app.errorhandler(Exception)
    def on_unexpected_error(error: Exception) -> Response:
        logger.exception("unhandled error", extra={"request_id": getattr(g, "record", None) and g.record.request_id})
        return error_response(ApiError(ErrorKind.INTERNAL, f"{type(error).__name__}: {error}"), current_dialect())

    return app


def serve_state(app: Flask) -> ServeState:
    """The worker's state behind an app made by `create_app` (the gunicorn worker stops it on SIGTERM)."""
    return app.extensions["serve"]


def _authorized(header: str, api_key: str) -> bool:
    scheme, _, token = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())


def _add_cors_headers(response: Response, origins: tuple[str, ...]) -> None:
    origin = request.headers.get("Origin")
    if "*" in origins:
        response.headers["Access-Control-Allow-Origin"] = "*"
    elif origin in origins:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Vary"] = "Origin"
    else:
        return
    response.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
    response.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type"


def _on_closed(state: ServeState, record: RequestRecord) -> None:
    """When the reply is fully sent (or abandoned): metrics and the request's log line."""
    record.finished_at = time.monotonic()
    try:
        if record.is_generation:
            _observe(state, record)
        log_request(record)
    except Exception:  # never let bookkeeping break a reply that is already out
        logger.exception("request bookkeeping failed")


def _observe(state: ServeState, record: RequestRecord) -> None:
    metrics = state.metrics
    metrics.count("tgi_request_count")
    failed = record.status >= 400 or record.error_kind is not None
    if failed:
        kind = next((v for k, v in _FAILURE_KIND.items() if k.value == record.error_kind), "validation")
        metrics.count("tgi_request_failure", err=kind)
        return
    metrics.count("tgi_request_success")
    end = record.finished_at
    metrics.duration.observe(end - record.started_at)
    if record.validated_at is not None:
        metrics.validation_duration.observe(record.validated_at - record.started_at)
        if record.first_token_at is not None:
            metrics.queue_duration.observe(record.first_token_at - record.validated_at)
            metrics.inference_duration.observe(end - record.first_token_at)
            if record.completion_tokens:
                metrics.time_per_token.observe((end - record.first_token_at) / record.completion_tokens)
    metrics.generated_tokens.observe(record.completion_tokens)
    metrics.input_length.observe(record.prompt_tokens)
    metrics.max_new_tokens.observe(record.max_new_tokens)
