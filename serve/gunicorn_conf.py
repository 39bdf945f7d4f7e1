"""gunicorn settings for the HTTP workers: gevent, many connections per worker, bounded client waits, the stop.

Bind address and worker count come from the launcher's command line (read from Settings).
"""

from model_handler import envs
from model_handler.logging_setup import parse_log_level
from serve.admission import forget_worker
from serve.metrics import mark_worker_dead

# gunicorn's gevent worker plus a table of client connections and the stop sequence (serve/http_worker.py).
worker_class = "serve.http_worker.ServeWorker"
# Past this, a new connection closes the one that has waited longest on its client (idle, or sending headers or
# a body): idle and slow clients never stop a worker from accepting, so /ping is always answered.
worker_connections = envs.WORKER_CONNECTIONS
# The time a client has to send a request's headers (from connecting, or on a kept-alive connection from its
# previous reply); the body gets as long again (serve/context.py).
keepalive = envs.REQUEST_READ_TIMEOUT
# The gevent worker heartbeats from its hub; only a hub blocked this long gets the worker restarted.
timeout = 120
# On SIGTERM a worker lets requests run for SHUTDOWN_GRACE_PERIOD, then ends them with an error and exits once those
# replies are out; this is when gunicorn gives up on it (SIGKILL). The launcher waits a little longer.
graceful_timeout = envs.SHUTDOWN_GRACE_PERIOD + 3
# gunicorn 27's control socket (~/.gunicorn/gunicorn.ctl, one path for every server on the machine) is not used.
control_socket_disable = True
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
