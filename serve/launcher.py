"""Starts and watches the two processes: the engine first, then gunicorn with gevent workers.

Each child runs in a session of its own, so a signal to the launcher's process group (Ctrl-C under `make serve`,
`kill -- -PGID`) reaches the launcher alone, and it stops them in order whoever was signalled: SIGTERM or
SIGINT stops gunicorn, whose workers accept nothing new and let in-flight requests run for SHUTDOWN_GRACE_PERIOD,
then end the rest with an error (the engine serves them meanwhile); then the engine stops (its tensor-parallel
ranks with it); then the launcher exits 0 with no process left. A child that exits on its own stops the other
and the launcher exits with its own status (EXIT_ENGINE_EXITED, EXIT_HTTP_EXITED), so SageMaker replaces the
instance instead of keeping a half-dead container. A launcher killed outright takes its children with it.
"""

from __future__ import annotations

import ctypes
import glob
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping

import psutil

from model_handler import envs
from model_handler.logging_setup import configure_logging
from serve.admission import create_table
from serve.connections import SPARE_CONNECTIONS
from serve.settings import Settings

logger = logging.getLogger("serve.launcher")

EXIT_STOPPED = 0
"""Stopped by SIGTERM or SIGINT, in order."""
EXIT_CONFIGURATION = 2
"""A variable has a bad value (the message names it)."""
EXIT_ENGINE_EXITED = 3
"""The engine process exited on its own: it failed to start (its log says why), crashed or was killed."""
EXIT_HTTP_EXITED = 4
"""gunicorn exited on its own."""

HTTP_STOP_MARGIN_S = 5.0
"""How long past SHUTDOWN_GRACE_PERIOD gunicorn has to end the remaining requests and exit before it is killed."""
ENGINE_STOP_TIMEOUT_S = 6.0
"""How long the engine has to stop (and stop its tensor-parallel ranks) before it is killed."""
_POLL_S = 0.1


class Launcher:
    def __init__(self, settings: Settings, environ: Mapping[str, str]) -> None:
        self.settings = settings
        self._socket_dir = tempfile.mkdtemp(prefix="sm-llm-")
        self.engine_address = f"ipc://{self._socket_dir}/engine.sock"
        self._env = {**environ, "ENGINE_ADDRESS": self.engine_address}
        metrics_dir = os.path.join(self._socket_dir, "metrics")
        os.mkdir(metrics_dir)
        # Every HTTP worker writes its metrics here and any of them answers /metrics with the sum (serve/metrics.py).
        # MAX_CONCURRENT_REQUESTS is counted for every worker together in this table (serve/admission.py).
        admission_file = os.path.join(self._socket_dir, "admission")
        create_table(admission_file, settings.num_workers)
        self._http_env = {**self._env, "PROMETHEUS_MULTIPROC_DIR": metrics_dir, "SERVE_ADMISSION_FILE": admission_file}
        self.engine: subprocess.Popen | None = None
        self.http: subprocess.Popen | None = None
        self._stop_signal: int | None = None

    def start(self) -> None:
        raise_open_files_limit(self.settings.num_workers * (self.settings.worker_connections + SPARE_CONNECTIONS))
        self.engine = _spawn(
            [sys.executable, "-m", "model_handler.server", "--address", self.engine_address], self._env
        )
        # gunicorn starts at once: /ping answers 503 while the model loads instead of refusing connections.
        self.http = _spawn(
            [
                sys.executable,
                "-m",
                "gunicorn",
                "--config",
                "python:serve.gunicorn_conf",
                "--bind",
                f"{self.settings.host}:{self.settings.port}",
                "--workers",
                str(self.settings.num_workers),
                "serve.wsgi:app",
            ],
            self._http_env,
        )
        logger.info(
            "launched",
            extra={"engine_pid": self.engine.pid, "http_pid": self.http.pid, "port": self.settings.port},
        )

    def request_stop(self, signum: int, _frame: object) -> None:
        if self._stop_signal is None:
            logger.info("stop requested", extra={"signal": signum, "grace_period_s": self.settings.shutdown_grace_s})
        self._stop_signal = signum

    def supervise(self) -> int:
        """Wait until a stop is requested or a child exits, stop both in order; returns the exit status."""
        status = EXIT_STOPPED
        while self._stop_signal is None:
            if self.engine.poll() is not None:
                logger.error(
                    "the engine process exited; stopping the HTTP server",
                    extra={"child": "engine", "exit_code": self.engine.returncode, "launcher_exit": EXIT_ENGINE_EXITED},
                )
                status = EXIT_ENGINE_EXITED
                break
            if self.http.poll() is not None:
                logger.error(
                    "the HTTP server exited; stopping the engine",
                    extra={"child": "http", "exit_code": self.http.returncode, "launcher_exit": EXIT_HTTP_EXITED},
                )
                status = EXIT_HTTP_EXITED
                break
            time.sleep(_POLL_S)
        self.stop()
        logger.info("stopped", extra={"exit_code": status})
        return status

    def stop(self) -> None:
        """gunicorn first (in-flight requests still need the engine: its workers end them within the grace
        period), then the engine; every process of either is gone when this returns."""
        _stop_tree(self.http, self.settings.shutdown_grace_s + HTTP_STOP_MARGIN_S)
        _stop_tree(self.engine, ENGINE_STOP_TIMEOUT_S)
        shutil.rmtree(self._socket_dir, ignore_errors=True)


def _spawn(argv: list[str], env: Mapping[str, str]) -> subprocess.Popen:
    """A child in a session of its own (group signals reach the launcher alone), killed if the launcher dies."""
    return subprocess.Popen(argv, env=env, start_new_session=True, preexec_fn=_death_signal_setter())


_PR_SET_PDEATHSIG = 1


def _death_signal_setter() -> Callable[[], None] | None:
    """What the child runs before exec on Linux: SIGKILL when the launcher dies, so a launcher killed outright
    leaves no engine or server behind in their own sessions (gunicorn's workers and the tensor-parallel ranks
    follow their parents on their own). libc is looked up here, in the parent: the child only calls it."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def set_death_signal() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)

    return set_death_signal


def _stop_tree(child: subprocess.Popen | None, timeout_s: float) -> None:
    """SIGTERM to the child, which stops its own processes; past `timeout_s`, SIGKILL to it and all of them. Any
    of its processes still alive once it has exited is killed too."""
    if child is None:
        return
    try:
        tree = [psutil.Process(child.pid)]
        tree += tree[0].children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    if child.poll() is None:
        child.terminate()
        try:
            child.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            logger.error("a child did not stop in time; killing it", extra={"pid": child.pid, "timeout_s": timeout_s})
    for process in tree[1:] + tree[:1]:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    child.wait()
    psutil.wait_procs(tree[1:], timeout=5)


def raise_open_files_limit(needed: int) -> None:
    """Let the workers hold WORKER_CONNECTIONS connections each: raise the soft limit on open files (1024 in some
    container runtimes) as far as the hard limit allows; the children inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = needed + 256  # the engine's and gunicorn's own files and sockets
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if target < wanted:
        logger.warning(
            "the open-files limit is lower than WORKER_CONNECTIONS needs; lower it or raise the limit (ulimit -n)",
            extra={"limit": target, "needed": wanted},
        )


def default_num_workers(dev_dir: str = "/dev") -> int:
    """WEB_CONCURRENCY when unset: two gunicorn workers where NVIDIA GPUs are visible, else one.

    On a GPU one worker cannot stream tokens as fast as the engine makes them at high concurrency and two can
    (bench/results/gpu-h100 has the measurement); on CPU the engine is far slower than one worker, and a second
    would only cost memory.
    """
    return 2 if glob.glob(os.path.join(dev_dir, "nvidia[0-9]*")) else 1


def main(argv: list[str] | None = None) -> int:
    """Entry point of `container/serve`; extra arguments (SageMaker passes `serve`) are ignored."""
    environ = dict(envs.process_environ())
    # Decided here, once, and passed on: every worker's Settings (and /info) then read the same count.
    environ.setdefault("WEB_CONCURRENCY", str(default_num_workers()))
    try:
        configure_logging(environ, process="launcher")
        settings = Settings.from_env(environ)
    except ValueError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIGURATION
    launcher = Launcher(settings, environ)
    signal.signal(signal.SIGTERM, launcher.request_stop)
    signal.signal(signal.SIGINT, launcher.request_stop)
    launcher.start()
    return launcher.supervise()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
