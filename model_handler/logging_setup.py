"""One JSON object per log line on stdout, what CloudWatch users filter on; shared by both processes.

The level comes from `SAGEMAKER_CONTAINER_LOG_LEVEL` (the SDK sets "20"), else `LOG_LEVEL`, else INFO.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping

from pythonjsonlogger.json import JsonFormatter

_LEVEL_VARIABLES = ("SAGEMAKER_CONTAINER_LOG_LEVEL", "LOG_LEVEL")


def parse_log_level(environ: Mapping[str, str]) -> int:
    """A numeric level ("20") or a name ("info", "WARNING"); ValueError naming the variable otherwise."""
    for name in _LEVEL_VARIABLES:
        raw = environ.get(name, "").strip()
        if not raw:
            continue
        if raw.isdigit():
            return int(raw)
        level = logging.getLevelName(raw.upper())
        if isinstance(level, int):
            return level
        raise ValueError(f"{name}={raw!r} is not a log level (use a number like 20 or a name like INFO)")
    return logging.INFO


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
