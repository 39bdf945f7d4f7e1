"""One JSON object per log line on stdout, what CloudWatch users filter on; shared by both processes.

The level comes from `SAGEMAKER_CONTAINER_LOG_LEVEL` (the SDK sets "20"), else `LOG_LEVEL`, else INFO.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping

from pythonjsonlogger.json import JsonFormatter

from model_handler import envs


def parse_log_level(environ: Mapping[str, str]) -> int:
    """SAGEMAKER_CONTAINER_LOG_LEVEL, else LOG_LEVEL, else INFO; ValueError naming the variable when bad."""
    name = envs.first_set(environ, "SAGEMAKER_CONTAINER_LOG_LEVEL", "LOG_LEVEL") or "LOG_LEVEL"
    return envs.get(environ, name)


def configure_logging(environ: Mapping[str, str], process: str | None = None) -> None:
    """Route the root logger to stdout as JSON lines; `process` names which side wrote the line."""
    handler = logging.StreamHandler(sys.stdout)
    static = {"process_name": process} if process else None
    handler.setFormatter(
        JsonFormatter(
            "{asctime}{levelname}{name}{process}{message}",
            style="{",
            rename_fields={"levelname": "level", "asctime": "time", "name": "logger", "process": "pid"},
            static_fields=static,
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(parse_log_level(environ))
