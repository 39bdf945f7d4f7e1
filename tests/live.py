"""Start the real processes for tests: an engine process alone, or the whole server on loopback.

`start_server` runs exactly what `container/serve` runs (launcher, gunicorn with gevent workers, engine
process, tiny model), on a free port; `start_engine` runs only the engine process, for route tests that
drive a Flask test client with a real SocketEngineClient.
"""

from __future__ import annotations

import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import zmq

from model_handler.engine_protocol import Heartbeat, Hello

REPO_ROOT = Path(__file__).resolve().parents[1]

# Small and quick on 2 cores; a test that needs other limits passes its own.
TEST_ENV = {
    # The tests' oracle is transformers in fp32; DTYPE=auto would pick bf16 on a CPU with native bf16.
    "DTYPE": "float32",
    "KV_CACHE_CPU_BYTES": str(64 * 1024 * 1024),
    "MAX_BATCH_SIZE": "32",
    "LOG_LEVEL": "WARNING",
    "PYTHONUNBUFFERED": "1",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _child_env(env: dict[str, str] | None) -> dict[str, str]:
    merged = {**os.environ, **TEST_ENV, **(env or {})}
    # Settings of the test process itself must not leak into the child unless asked for.
    for name in ("SAGEMAKER_BIND_TO_PORT",):
        if env is None or name not in env:
            merged.pop(name, None)
    return merged


@dataclass
class EngineHandle:
    address: str
    process: subprocess.Popen
    log_path: Path
    _dir: str = ""

    def stop(self) -> None:
        _stop(self.process, 10.0)
        shutil.rmtree(self._dir, ignore_errors=True)

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_engine(env: dict[str, str] | None = None, timeout_s: float = 120.0) -> EngineHandle:
    """Start `python -m model_handler.server` and wait for a ready heartbeat."""
    directory = tempfile.mkdtemp(prefix="engine-test-")
    address = f"ipc://{directory}/engine.sock"
    log_path = Path(directory) / "engine.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "model_handler.server", "--address", address],
        env=_child_env(env),
        cwd=REPO_ROOT,
        stdout=log_path.open("wb"),
        stderr=subprocess.STDOUT,
    )
    handle = EngineHandle(address, process, log_path, directory)
    try:
        _wait_engine_ready(address, process, timeout_s)
    except Exception as exc:
        _stop(process, 10.0)
        logs = log_path.read_text(errors="replace")
        handle.stop()
        raise RuntimeError(f"engine did not become ready ({exc}):\n{logs}") from None
    return handle


def _wait_engine_ready(address: str, process: subprocess.Popen, timeout_s: float) -> None:
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    sock.send(pickle.dumps(Hello(worker_pid=os.getpid())))
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"engine exited with {process.returncode}")
            if sock.poll(200):
                message = pickle.loads(sock.recv())
                if isinstance(message, Heartbeat) and message.ready:
                    return
                if isinstance(message, Heartbeat) and message.error:
                    raise RuntimeError(message.error)
        raise TimeoutError("no ready heartbeat")
    finally:
        sock.close(linger=0)
        context.term()


@dataclass
class LiveServer:
    port: int
    process: subprocess.Popen
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self, timeout_s: float = 30.0) -> int:
        return _stop(self.process, timeout_s)

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_server(env: dict[str, str] | None = None, timeout_s: float = 120.0) -> LiveServer:
    """Run `container/serve` on a free port and wait until `/ping` says 200."""
    port = free_port()
    child_env = _child_env({"PORT": str(port), **(env or {})})
    log_dir = Path(tempfile.mkdtemp(prefix="server-test-"))
    log_path = log_dir / "server.log"
    process = subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "container" / "serve"), "serve"],
        env=child_env,
        cwd=REPO_ROOT,
        stdout=log_path.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    server = LiveServer(port, process, log_path, child_env)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{server.logs()}")
        try:
            with urllib.request.urlopen(f"{server.url}/ping", timeout=2) as reply:
                if reply.status == 200:
                    return server
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"server did not become healthy in {timeout_s} s:\n{server.logs()}")


def _stop(process: subprocess.Popen, timeout_s: float) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode
