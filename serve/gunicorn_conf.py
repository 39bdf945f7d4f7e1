"""gunicorn settings for the HTTP workers: gevent, many connections per worker, SageMaker's timeouts.

Bind address and worker count come from the launcher's command line (read from Settings).
"""

from model_handler import envs
from model_handler.logging_setup import parse_log_level
from serve.admission import forget_worker
from serve.metrics import mark_worker_dead

worker_class = "gevent"
worker_connections = 1000
# The gevent worker heartbeats from its hub; only a hub blocked this long gets the worker restarted.
timeout = 120
# SageMaker sends SIGKILL 30 s after SIGTERM: finish in-flight requests within that.
graceful_timeout = 25
# Idle keep-alive connections hold a graceful stop until they time out: keep them short.
keepalive = 5
accesslog = None


def child_exit(_server, worker) -> None:
    """A worker that exits (restart, stop, crash) stops counting as in flight, in /metrics and for admission."""
    mark_worker_dead(worker.pid)
    if envs.SERVE_ADMISSION_FILE:
        forget_worker(envs.SERVE_ADMISSION_FILE, worker.pid)


loglevel = "warning" if parse_log_level(envs.process_environ()) > 20 else "info"
logconfig_dict = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "json": {
            "()": "pythonjsonlogger.json.JsonFormatter",
            "fmt": "{asctime}{levelname}{name}{process}{message}",
            "style": "{",
            "rename_fields": {"levelname": "level", "asctime": "time", "name": "logger", "process": "pid"},
            "static_fields": {"process_name": "gunicorn"},
        }
    },
    "handlers": {"stdout": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stdout"}},
    "root": {"level": loglevel.upper(), "handlers": ["stdout"]},
    "loggers": {
        "gunicorn.error": {"handlers": ["stdout"], "level": loglevel.upper(), "propagate": False},
        "gunicorn.access": {"handlers": ["stdout"], "level": "WARNING", "propagate": False},
    },
}
