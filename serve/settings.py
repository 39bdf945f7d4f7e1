"""Settings of the HTTP side, read once from the environment by `Settings.from_env` (a pure function).

The variables are declared in `model_handler/envs.py`. Limits that depend on the model (the longest prompt,
prompt + generation) are the engine's: they reach the workers in `EngineInfo` (see `TokenLimits.of`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

from model_handler import envs
from model_handler.engine_protocol import EngineInfo
from model_handler.logging_setup import parse_log_level


@dataclass(slots=True, frozen=True)
class TokenLimits:
    """The effective prompt and prompt+generation limits for the loaded model."""

    max_input_tokens: int
    max_total_tokens: int

    @classmethod
    def of(cls, info: EngineInfo) -> TokenLimits:
        return cls(max_input_tokens=info.max_input_tokens, max_total_tokens=info.max_model_len)


@dataclass(slots=True, frozen=True)
class Settings:
    """Everything the HTTP workers and the launcher read from the environment."""

    host: str = "0.0.0.0"
    port: int = envs.BY_NAME["PORT"].default
    num_workers: int = 1
    messages_api_enabled: bool | None = None
    """True: /invocations takes OpenAI chat bodies only; False: TGI bodies only; None: decided by shape."""
    max_stop_sequences: int = envs.BY_NAME["MAX_STOP_SEQUENCES"].default
    max_top_n_tokens: int = envs.BY_NAME["MAX_TOP_N_TOKENS"].default
    max_best_of: int = envs.BY_NAME["MAX_BEST_OF"].default
    max_client_batch_size: int = envs.BY_NAME["MAX_CLIENT_BATCH_SIZE"].default
    max_concurrent_requests: int = envs.BY_NAME["MAX_CONCURRENT_REQUESTS"].default
    api_key: str | None = None
    payload_limit: int = envs.BY_NAME["PAYLOAD_LIMIT"].default
    cors_allow_origins: tuple[str, ...] = ()
    served_model_name: str | None = None
    engine_address: str | None = None
    admission_file: str | None = None
    log_level: int = logging.INFO
    compute_type: str = envs.BY_NAME["COMPUTE_TYPE"].default
    tool_call_parser: str = envs.BY_NAME["TOOL_CALL_PARSER"].default
    """How tool calls are written and parsed: `auto` (detected from the chat template) or a format's name."""
    request_read_timeout_s: int = envs.BY_NAME["REQUEST_READ_TIMEOUT"].default
    worker_connections: int = envs.BY_NAME["WORKER_CONNECTIONS"].default
    shutdown_grace_s: int = envs.BY_NAME["SHUTDOWN_GRACE_PERIOD"].default

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        def get(name: str):
            return envs.get(environ, name)

        port_name = envs.first_set(environ, "SAGEMAKER_BIND_TO_PORT", "PORT") or "PORT"
        return cls(
            port=get(port_name),
            num_workers=get("WEB_CONCURRENCY") or 1,
            messages_api_enabled=get("MESSAGES_API_ENABLED"),
            max_stop_sequences=get("MAX_STOP_SEQUENCES"),
            max_top_n_tokens=get("MAX_TOP_N_TOKENS"),
            max_best_of=get("MAX_BEST_OF"),
            max_client_batch_size=get("MAX_CLIENT_BATCH_SIZE"),
            max_concurrent_requests=get("MAX_CONCURRENT_REQUESTS"),
            api_key=get("API_KEY"),
            payload_limit=get("PAYLOAD_LIMIT"),
            cors_allow_origins=get("CORS_ALLOW_ORIGIN"),
            served_model_name=get("SERVED_MODEL_NAME"),
            engine_address=get("ENGINE_ADDRESS"),
            admission_file=get("SERVE_ADMISSION_FILE"),
            log_level=parse_log_level(environ),
            compute_type=get("COMPUTE_TYPE"),
            tool_call_parser=get("TOOL_CALL_PARSER"),
            request_read_timeout_s=get("REQUEST_READ_TIMEOUT"),
            worker_connections=get("WORKER_CONNECTIONS"),
            shutdown_grace_s=get("SHUTDOWN_GRACE_PERIOD"),
        )
