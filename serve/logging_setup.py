"""The one log line per request: id, route, status, timings and token counts, as JSON fields.

Handlers and the JSON formatter are set up once per process by `model_handler.logging_setup.configure_logging`
(the level follows SAGEMAKER_CONTAINER_LOG_LEVEL / LOG_LEVEL); this module only decides what a request logs.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

access_logger = logging.getLogger("serve.access")


def _ms(start: float | None, end: float | None) -> float | None:
    if start is None or end is None:
        return None
    return round((end - start) * 1000.0, 3)


@dataclass(slots=True)
class RequestRecord:
    """What one HTTP request did, filled in as it goes and logged when its reply is closed."""

    request_id: str
    method: str
    route: str
    started_at: float = field(default_factory=time.monotonic)
    status: int = 0
    dialect: str = ""
    inference_id: str | None = None
    target_model: str | None = None
    validated_at: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    max_new_tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None
    error_kind: str | None = None
    stream: bool = False
    is_generation: bool = False
    client: dict = field(default_factory=dict)
    """What the client says about itself (OpenAI's `user`, `safety_identifier`, `metadata`, ...)."""

    def fields(self) -> dict:
        end = self.finished_at or time.monotonic()
        out = {
            "request_id": self.request_id,
            "method": self.method,
            "route": self.route,
            "status": self.status,
            "stream": self.stream,
            "total_ms": _ms(self.started_at, end),
        }
        if self.is_generation:
            out.update(
                validation_ms=_ms(self.started_at, self.validated_at),
                queue_ms=_ms(self.validated_at, self.first_token_at),
                ttft_ms=_ms(self.started_at, self.first_token_at),
                prompt_tokens=self.prompt_tokens,
                completion_tokens=self.completion_tokens,
                finish_reason=self.finish_reason,
            )
        for name in ("inference_id", "target_model", "error", "error_kind"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        if self.client:
            out["client"] = self.client
        return out


_QUIET_ROUTES = frozenset({"/ping", "/health", "/metrics"})
"""Polled every few seconds by SageMaker and Prometheus: logged at DEBUG, or they would drown the rest."""


def log_request(record: RequestRecord) -> None:
    if record.route in _QUIET_ROUTES and record.method == "GET":
        level = logging.DEBUG
    else:
        level = logging.ERROR if record.status >= 500 else logging.INFO
    access_logger.log(level, "request", extra=record.fields())
