"""Start, wait for, and always stop the servers under test, each on its own loopback port.

Each server runs in its own session (process group), so stopping it kills its workers too; every started
server is registered and stopped at interpreter exit even if the benchmark fails half-way.
"""

from __future__ import annotations

import atexit
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"


@dataclass(slots=True)
class CbSettings:
    """`transformers serve --continuous-batching` cache sizing: small and explicit (the default takes ~9.5 GB)."""

    block_size: int = 64
    max_batch_tokens: int = 512
    num_blocks: int = 0  # 0: enough for max_concurrency requests of prompt + output tokens (see for_load)

    def for_load(self, max_concurrency: int, tokens_per_request: int) -> CbSettings:
        if self.num_blocks:
            return self
        per_request = math.ceil(tokens_per_request / self.block_size) + 1  # +1: a partly filled last block
        return CbSettings(self.block_size, self.max_batch_tokens, max_concurrency * per_request + 8)


@dataclass(slots=True, frozen=True)
class ServerSpec:
    name: str
    flavor: str  # request body flavor, see workload.chat_body
    ready_path: str
    description: str


SERVERS: dict[str, ServerSpec] = {
    spec.name: spec
    for spec in (
        ServerSpec("ours", "openai-ext", "/ping", "container/serve (this project), its default DTYPE=auto"),
        ServerSpec("ours-fp32", "openai-ext", "/ping", "container/serve with DTYPE=float32"),
        ServerSpec(
            "ours-torch-attn",
            "openai-ext",
            "/ping",
            "container/serve with ATTENTION_BACKEND=torch (the CPU path without the C++ kernels)",
        ),
        ServerSpec("tf-serve", "tf-serve", "/health", "transformers serve, generate() one request at a time"),
        ServerSpec("tf-serve-cb", "tf-serve-cb", "/health", "transformers serve --continuous-batching"),
        ServerSpec("tf-serve-bf16", "tf-serve", "/health", "tf-serve with --dtype bfloat16"),
        ServerSpec("tf-serve-cb-bf16", "tf-serve-cb", "/health", "tf-serve-cb with --dtype bfloat16"),
        ServerSpec("naive", "openai-ext", "/health", "bench/naive_server.py, serial generate() per request"),
        ServerSpec("naive-parallel", "openai-ext", "/health", "bench/naive_server.py --parallel, thread each"),
    )
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def model_name_for(spec: ServerSpec, model_dir: str) -> str:
    # transformers serve with a preloaded model and ours refuse the names of models they do not serve; the naive
    # server takes any.
    return model_dir if spec.name.startswith(("tf-serve", "ours")) else "bench"


def _command(spec: ServerSpec, model_dir: str, port: int, cb: CbSettings) -> tuple[list[str], dict[str, str]]:
    bin_dir = Path(sys.executable).parent
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    if spec.name in ("ours", "ours-fp32", "ours-torch-attn"):
        env.update(HF_MODEL_ID=model_dir, PORT=str(port), SAGEMAKER_BIND_TO_PORT=str(port))
        if spec.name == "ours-fp32":
            env["DTYPE"] = "float32"
        if spec.name == "ours-torch-attn":
            env["ATTENTION_BACKEND"] = "torch"
        return [sys.executable, str(REPO_ROOT / "container" / "serve"), "serve"], env  # as `docker run IMAGE serve`
    if spec.name.startswith("tf-serve"):
        argv = [
            str(bin_dir / "transformers"),
            "serve",
            model_dir,
            "--device",
            "cpu",
            "--host",
            HOST,
            "--port",
            str(port),
            "--log-level",
            "warning",
        ]
        if spec.flavor == "tf-serve-cb":
            argv += [
                "--continuous-batching",
                "--cb-block-size",
                str(cb.block_size),
                "--cb-num-blocks",
                str(cb.num_blocks),
                "--cb-max-batch-tokens",
                str(cb.max_batch_tokens),
            ]
        if spec.name.endswith("-bf16"):
            argv += ["--dtype", "bfloat16"]
        return argv, env
    if spec.name.startswith("naive"):
        argv = [sys.executable, "-m", "bench.naive_server", "--model", model_dir, "--host", HOST, "--port", str(port)]
        return argv + (["--parallel"] if spec.name == "naive-parallel" else []), env
    raise ValueError(f"unknown server {spec.name!r}; choose from {', '.join(SERVERS)}")


class ServerProcess:
    """One running server; use as a context manager so it is stopped on every path out."""

    _live: set[ServerProcess] = set()

    def __init__(self, spec: ServerSpec, model_dir: str, log_path: Path, cb: CbSettings | None = None) -> None:
        self.spec = spec
        self.model_dir = model_dir
        self.port = free_port()
        self.log_path = log_path
        self.cb = cb or CbSettings()
        self._proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def pid(self) -> int | None:
        """The server's first process (its launcher or only process); its descendants are the rest."""
        return None if self._proc is None else self._proc.pid

    @property
    def command(self) -> list[str]:
        return _command(self.spec, self.model_dir, self.port, self.cb)[0]

    def start(self, ready_timeout_s: float = 300.0) -> ServerProcess:
        argv, env = _command(self.spec, self.model_dir, self.port, self.cb)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen(
                argv,
                cwd=REPO_ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        ServerProcess._live.add(self)
        deadline = time.monotonic() + ready_timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"{self.spec.name} exited with {self._proc.returncode}:\n{self.log_tail()}")
            if self._is_ready():
                return self
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"{self.spec.name} not ready after {ready_timeout_s:.0f}s:\n{self.log_tail()}")

    def _is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + self.spec.ready_path, timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def log_tail(self, num_lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-num_lines:])
        except OSError:
            return "(no log)"

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM the server's process group, SIGKILL it after `grace_s`."""
        ServerProcess._live.discard(self)
        proc = self._proc
        if proc is None or proc.poll() is not None and not _group_alive(proc.pid):
            return
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(proc.pid, sig)  # the group id is the server's pid: start_new_session=True
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                continue
            if not _group_alive(proc.pid):
                break
            time.sleep(0.5)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @classmethod
    def stop_all(cls) -> None:
        for server in list(cls._live):
            server.stop(grace_s=3.0)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


atexit.register(ServerProcess.stop_all)
