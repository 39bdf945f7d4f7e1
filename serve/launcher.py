"""Starts and watches the two processes: the engine first, then gunicorn with gevent workers.

SIGTERM drains: gunicorn stops accepting and finishes in-flight requests (the engine keeps serving them),
then the engine stops; exit 0. If either child dies on its own, the other is stopped and we exit non-zero,
so SageMaker replaces the instance instead of keeping a half-dead container.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping

from model_handler import envs
from model_handler.logging_setup import configure_logging
from serve.admission import create_table
from serve.settings import Settings

logger = logging.getLogger("serve.launcher")

DRAIN_TIMEOUT_S = 25.0
"""SageMaker sends SIGKILL 30 s after SIGTERM; leave time for the engine to stop after the drain."""


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
        self._stopping = False

    def start(self) -> None:
        self.engine = subprocess.Popen(
            [sys.executable, "-m", "model_handler.server", "--address", self.engine_address], env=self._env
        )
        # gunicorn starts at once: /ping answers 503 while the model loads instead of refusing connections.
        self.http = subprocess.Popen(
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
            env=self._http_env,
        )
        logger.info(
            "launched",
            extra={"engine_pid": self.engine.pid, "http_pid": self.http.pid, "port": self.settings.port},
        )

    def request_stop(self, signum: int, _frame: object) -> None:
        logger.info("stop requested", extra={"signal": signum})
        self._stopping = True

    def supervise(self) -> int:
        """Wait until a stop is requested or a child exits; returns the process exit code."""
        children = [("engine", self.engine), ("http", self.http)]
        while not self._stopping:
            for name, child in children:
                code = child.poll() if child is not None else 1
                if code is not None:
                    logger.error("child process exited; stopping", extra={"child": name, "exit_code": code})
                    self.stop()
                    return code if code else 1
            time.sleep(0.2)
        self.stop()
        return 0

    def stop(self) -> None:
        """Drain HTTP first (in-flight requests still need the engine), then stop the engine."""
        _terminate(self.http, DRAIN_TIMEOUT_S)
        _terminate(self.engine, 4.0)
        shutil.rmtree(self._socket_dir, ignore_errors=True)


def _terminate(child: subprocess.Popen | None, timeout_s: float) -> None:
    if child is None or child.poll() is not None:
        return
    child.terminate()
    try:
        child.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


def default_num_workers(dev_dir: str = "/dev") -> int:
    """WEB_CONCURRENCY when unset: two gunicorn workers where NVIDIA GPUs are visible, else one.

    Measured on an H100 (the 100M model, 128 streams; bench/results/gpu-h100): one worker could
    not stream tokens as fast as the engine made them (ITL p50 7-10 ms against a ~2.9 ms step, ~5 tokens to a
    chunk); two streamed at the engine's pace (ITL p50 3.1-3.3 ms). On CPU the engine is far slower than one
    worker, and a second would only cost memory.
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
        return 2
    launcher = Launcher(settings, environ)
    signal.signal(signal.SIGTERM, launcher.request_stop)
    signal.signal(signal.SIGINT, launcher.request_stop)
    launcher.start()
    return launcher.supervise()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
