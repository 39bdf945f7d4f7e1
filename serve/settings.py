"""Settings of the HTTP side, read once from the environment by `Settings.from_env` (a pure function).

TGI's and SageMaker's variable names; a bad value raises ValueError naming the variable. Limits that depend on
the model (max input/total tokens) are resolved against the engine's context length by `token_limits`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

from model_handler.logging_setup import parse_log_level
from serve.admission import ADMISSION_FILE_ENV
from serve.tool_formats import AUTO, FORMATS

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
# SageMaker always passes these (two of them empty); they are accepted and ignored.
IGNORED_VARIABLES = ("SAGEMAKER_PROGRAM", "SAGEMAKER_SUBMIT_DIRECTORY", "SAGEMAKER_REGION")
DEFAULT_PORT = 8080


@dataclass(slots=True, frozen=True)
class TokenLimits:
    """The effective prompt and prompt+generation limits for the loaded model."""

    max_input_tokens: int
    max_total_tokens: int


@dataclass(slots=True, frozen=True)
class Settings:
    """Everything the HTTP workers and the launcher read from the environment."""

    host: str = "0.0.0.0"
    port: int = DEFAULT_PORT
    num_workers: int = 1
    messages_api_enabled: bool | None = None
    """True: /invocations takes OpenAI chat bodies only; False: TGI bodies only; None: decided by shape."""
    max_input_tokens: int | None = None
    max_total_tokens: int | None = None
    max_stop_sequences: int = 4
    max_top_n_tokens: int = 5
    max_best_of: int = 2
    max_client_batch_size: int = 4
    max_concurrent_requests: int = 128
    api_key: str | None = None
    payload_limit: int = 2_000_000
    cors_allow_origins: tuple[str, ...] = ()
    served_model_name: str | None = None
    engine_address: str | None = None
    admission_file: str | None = None
    log_level: int = logging.INFO
    compute_type: str = "gpu+optimized"
    tool_call_parser: str = AUTO
    """How tool calls are written and parsed: `auto` (detected from the chat template) or a format's name."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        env = _Env(environ)
        if env.raw("MAX_INPUT_TOKENS") is not None and env.raw("MAX_INPUT_LENGTH") is not None:
            raise ValueError("MAX_INPUT_TOKENS and MAX_INPUT_LENGTH are aliases: set only one of them")
        input_name = "MAX_INPUT_TOKENS" if env.raw("MAX_INPUT_TOKENS") is not None else "MAX_INPUT_LENGTH"
        max_input = env.int(input_name, None, minimum=1)
        max_total = env.int("MAX_TOTAL_TOKENS", None, minimum=2)
        if max_input is not None and max_total is not None and max_input >= max_total:
            raise ValueError(
                f"{input_name}={max_input} must be smaller than MAX_TOTAL_TOKENS={max_total} "
                "(the prompt needs room for at least one new token)"
            )
        port_name = "SAGEMAKER_BIND_TO_PORT" if env.raw("SAGEMAKER_BIND_TO_PORT") is not None else "PORT"
        origins = env.raw("CORS_ALLOW_ORIGIN")
        return cls(
            port=env.int(port_name, DEFAULT_PORT, minimum=1, maximum=65535),
            num_workers=env.int("WEB_CONCURRENCY", 1, minimum=1),
            messages_api_enabled=env.bool("MESSAGES_API_ENABLED"),
            max_input_tokens=max_input,
            max_total_tokens=max_total,
            max_stop_sequences=env.int("MAX_STOP_SEQUENCES", 4, minimum=0),
            max_top_n_tokens=env.int("MAX_TOP_N_TOKENS", 5, minimum=0),
            max_best_of=env.int("MAX_BEST_OF", 2, minimum=1),
            max_client_batch_size=env.int("MAX_CLIENT_BATCH_SIZE", 4, minimum=1),
            max_concurrent_requests=env.int("MAX_CONCURRENT_REQUESTS", 128, minimum=1),
            api_key=env.raw("API_KEY"),
            payload_limit=env.int("PAYLOAD_LIMIT", 2_000_000, minimum=1),
            cors_allow_origins=tuple(o.strip() for o in origins.split(",") if o.strip()) if origins else (),
            served_model_name=env.raw("SERVED_MODEL_NAME"),
            engine_address=env.raw("ENGINE_ADDRESS"),
            admission_file=env.raw(ADMISSION_FILE_ENV),
            log_level=parse_log_level(environ),
            compute_type=env.raw("COMPUTE_TYPE") or "gpu+optimized",
            tool_call_parser=env.choice("TOOL_CALL_PARSER", AUTO, (AUTO, *FORMATS)),
        )

    def token_limits(self, max_model_len: int) -> TokenLimits:
        """The limits for a model with this context length; unset ones default to it (TGI's rule)."""
        total = self.max_total_tokens if self.max_total_tokens is not None else max_model_len
        if total > max_model_len:
            raise ValueError(f"MAX_TOTAL_TOKENS={total} is larger than the engine's context length {max_model_len}")
        max_input = self.max_input_tokens if self.max_input_tokens is not None else total - 1
        if max_input >= total:
            raise ValueError(
                f"MAX_INPUT_TOKENS={max_input} must be smaller than the total token limit {total} "
                "(MAX_TOTAL_TOKENS or the engine's context length)"
            )
        return TokenLimits(max_input_tokens=max_input, max_total_tokens=total)


class _Env:
    """Typed reads of one environment mapping; an empty value counts as unset (SageMaker sends some empty)."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ

    def raw(self, name: str) -> str | None:
        value = self._environ.get(name)
        if value is None or not value.strip():
            return None
        return value.strip()

    def int(self, name: str, default: int | None, minimum: int | None = None, maximum: int | None = None):
        raw = self.raw(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(f"{name}={raw!r} is not an integer") from None
        if minimum is not None and value < minimum:
            raise ValueError(f"{name}={value} must be >= {minimum}")
        if maximum is not None and value > maximum:
            raise ValueError(f"{name}={value} must be <= {maximum}")
        return value

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        raw = self.raw(name)
        if raw is None:
            return default
        if raw.lower() not in choices:
            raise ValueError(f"{name}={raw!r} is not one of: {', '.join(choices)}")
        return raw.lower()

    def bool(self, name: str) -> bool | None:
        raw = self.raw(name)
        if raw is None:
            return None
        if raw.lower() in _TRUE:
            return True
        if raw.lower() in _FALSE:
            return False
        raise ValueError(f"{name}={raw!r} is not a boolean (use true or false)")
