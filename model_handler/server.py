"""The engine process: a ZeroMQ ROUTER socket to the HTTP workers, and the step loop around `Engine`.

An I/O thread owns the socket: it queues incoming requests, forwards each step's outputs and sends heartbeats
even while a long step or the model load holds the main thread (torch releases the GIL), so `/ping` on the
HTTP side never waits on the engine. Run as `python -m model_handler.server --address ipc:///tmp/x.sock`.
"""

from __future__ import annotations

import argparse
import logging
import pickle
import queue
import signal
import sys
import threading
import time
import traceback
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import psutil
import zmq

from model_handler import envs
from model_handler.engine_protocol import (
    AbortRequests,
    EngineInfo,
    EngineRequest,
    FinishReason,
    Heartbeat,
    Hello,
    OutputBatch,
    RequestOutput,
    StepEngine,
)

logger = logging.getLogger("model_handler.server")

HEARTBEAT_INTERVAL_S = 0.5
_OUTBOX_ADDRESS = "inproc://engine-outbox"


@dataclass(slots=True)
class WorkerGone:
    """The I/O thread's note to the step loop: this worker's process has exited (killed, crashed, restarted)."""

    worker_pid: int


@dataclass(slots=True)
class Wakeup:
    """The engine's note to the step loop, from a compile thread: a request it held back is ready to step."""


class EngineIO:
    """Socket side of the engine process; runs in its own thread and talks to the step loop through queues."""

    def __init__(self, context: zmq.Context, address: str) -> None:
        self.inbox: queue.Queue[tuple[bytes, Any]] = queue.Queue()
        self._context = context
        self._workers: set[bytes] = set()
        self._worker_pids: dict[bytes, int] = {}
        self._gone: set[bytes] = set()  # workers found dead: what they sent before dying is dropped
        self._status = Heartbeat(ready=False)
        self._stop = threading.Event()
        self._router = context.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 0)
        self._router.bind(address)
        self._outbox_pull = context.socket(zmq.PULL)
        self._outbox_pull.bind(_OUTBOX_ADDRESS)
        self._thread = threading.Thread(target=self._run, name="engine-io", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)

    def set_status(self, status: Heartbeat) -> None:
        """Replace what the next heartbeats say (a single reference swap, safe across threads)."""
        self._status = status

    def outbox(self) -> zmq.Socket:
        """A PUSH socket for the step loop's thread; zmq sockets must stay in the thread that uses them."""
        push = self._context.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 1000)
        push.connect(_OUTBOX_ADDRESS)
        return push

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._outbox_pull, zmq.POLLIN)
        next_heartbeat = 0.0
        while not self._stop.is_set():
            timeout_ms = max(0.0, next_heartbeat - time.monotonic()) * 1000
            events = dict(poller.poll(timeout_ms))
            if self._outbox_pull in events:
                while True:
                    try:
                        identity, payload = self._outbox_pull.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._router.send_multipart([identity, payload])
            if self._router in events:
                while True:
                    try:
                        identity, payload = self._router.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._on_message(identity, pickle.loads(payload))
            if time.monotonic() >= next_heartbeat:
                self._forget_dead_workers()
                self._send_heartbeats()
                next_heartbeat = time.monotonic() + HEARTBEAT_INTERVAL_S
        self._router.close(linger=0)
        self._outbox_pull.close(linger=0)

    def _on_message(self, identity: bytes, message: Any) -> None:
        if identity in self._gone:
            return
        if isinstance(message, Hello):
            self._workers.add(identity)
            self._worker_pids[identity] = message.worker_pid
            self._router.send_multipart([identity, pickle.dumps(self._status)])
            logger.info("HTTP worker connected", extra={"worker_pid": message.worker_pid})
        else:
            self._workers.add(identity)
            self.inbox.put((identity, message))

    def _forget_dead_workers(self) -> None:
        """A worker whose process is gone can never read its outputs: the step loop aborts its requests, which
        would otherwise run to their max_tokens in the batch (gunicorn restarts a killed or stuck worker)."""
        for identity, pid in list(self._worker_pids.items()):
            if psutil.pid_exists(pid):
                continue
            del self._worker_pids[identity]
            self._workers.discard(identity)
            self._gone.add(identity)
            self.inbox.put((identity, WorkerGone(pid)))

    def _send_heartbeats(self) -> None:
        payload = pickle.dumps(self._status)
        for identity in self._workers:
            self._router.send_multipart([identity, payload])


class EngineServer:
    """The step loop: admit requests, run `Engine.step()`, send each worker one batch of outputs per step."""

    def __init__(self, engine: StepEngine, io: EngineIO) -> None:
        self.engine = engine
        self.io = io
        self._outbox = io.outbox()
        self._owners: dict[str, bytes] = {}
        self._stop = threading.Event()
        self._info: EngineInfo = engine.info()
        # Requests held back while their grammar compiles do not keep the loop busy: it sleeps on the inbox,
        # and the compile's end puts a Wakeup there.
        engine.set_wakeup(lambda: io.inbox.put((b"", Wakeup())))

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        while not self._stop.is_set():
            self._admit(block=not self.engine.has_ready_requests())
            if self.engine.has_ready_requests():
                self._step()
            self._publish_status()

    def _admit(self, block: bool) -> None:
        try:
            items = [self.io.inbox.get(timeout=HEARTBEAT_INTERVAL_S)] if block else []
        except queue.Empty:
            return
        while True:
            try:
                items.append(self.io.inbox.get_nowait())
            except queue.Empty:
                break
        rejected: dict[bytes, list[RequestOutput]] = defaultdict(list)
        for identity, message in items:
            if isinstance(message, EngineRequest):
                try:
                    self.engine.add_request(message)
                except ValueError as exc:
                    rejected[identity].append(
                        RequestOutput.failure(message.request_id, FinishReason.REJECTED, str(exc))
                    )
                    continue
                self._owners[message.request_id] = identity
            elif isinstance(message, AbortRequests):
                self._abort([rid for rid in message.request_ids if rid in self._owners])
            elif isinstance(message, WorkerGone):
                ids = [rid for rid, owner in self._owners.items() if owner == identity]
                self._abort(ids)
                # A worker that stops in order has ended its requests already; one that died may have left some.
                logger.log(
                    logging.WARNING if ids else logging.INFO,
                    "HTTP worker gone; its requests aborted",
                    extra={"worker_pid": message.worker_pid, "aborted": len(ids)},
                )
        for identity, outputs in rejected.items():
            self._send(identity, outputs)

    def _abort(self, ids: list[str]) -> None:
        if ids:
            self.engine.abort_requests(ids)
            for rid in ids:
                del self._owners[rid]

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception:  # a failed step must not take the other requests' server down with it
            logger.error("engine step failed", extra={"traceback": traceback.format_exc()})
            self._fail_all("the engine step raised an error")
            return
        by_owner: dict[bytes, list[RequestOutput]] = defaultdict(list)
        for output in outputs:
            identity = self._owners.get(output.request_id)
            if identity is None:  # aborted by its worker meanwhile
                continue
            by_owner[identity].append(output)
            if output.finished:
                del self._owners[output.request_id]
        for identity, batch in by_owner.items():
            self._send(identity, batch)

    def _fail_all(self, message: str) -> None:
        ids = list(self._owners)
        self.engine.abort_requests(ids)
        by_owner: dict[bytes, list[RequestOutput]] = defaultdict(list)
        for rid in ids:
            by_owner[self._owners.pop(rid)].append(RequestOutput.failure(rid, FinishReason.ERROR, message))
        for identity, batch in by_owner.items():
            self._send(identity, batch)

    def _send(self, identity: bytes, outputs: list[RequestOutput]) -> None:
        self._outbox.send_multipart([identity, pickle.dumps(OutputBatch(outputs), protocol=pickle.HIGHEST_PROTOCOL)])

    def _publish_status(self) -> None:
        num_running, num_waiting, num_free_blocks = self.engine.stats()
        self.io.set_status(
            Heartbeat(
                ready=True,
                info=self._info,
                num_running=num_running,
                num_waiting=num_waiting,
                num_free_blocks=num_free_blocks,
            )
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--address", required=True, help="ZeroMQ address to bind, e.g. ipc:///tmp/engine.sock")
    args = parser.parse_args(argv)

    from model_handler.logging_setup import configure_logging

    configure_logging(envs.process_environ(), process="engine")
    context = zmq.Context()
    io = EngineIO(context, args.address)
    io.start()

    try:
        from model_handler.model_source import check_a_model_is_given_on_sagemaker

        check_a_model_is_given_on_sagemaker(envs.process_environ())  # before torch's import: fail within seconds
        import torch

        from model_handler.config import EngineConfig
        from model_handler.cpu_threads import configure_engine_process
        from model_handler.engine import Engine
        from model_handler.startup_progress import StartupPhases

        started = time.monotonic()
        phases = StartupPhases()  # each phase logs its duration; the ready line sums them up
        config = EngineConfig.from_env(envs.process_environ(), phases=phases)
        configure_engine_process(config.cpu_threads, torch.device(config.device).type)
        engine = Engine(config, phases)
    except Exception as exc:  # tell the workers why, then exit non-zero so the launcher stops the container
        logger.error("engine failed to start", extra={"error": str(exc), "traceback": traceback.format_exc()})
        io.set_status(Heartbeat(ready=False, error=f"engine failed to start: {exc}"))
        time.sleep(2 * HEARTBEAT_INTERVAL_S)
        io.stop()
        return 1

    server = EngineServer(engine, io)
    info = engine.info()
    logger.info(
        "engine ready",
        extra={
            "model_id": info.model_id,
            "device": info.device,
            "dtype": info.dtype,
            "num_kv_blocks": info.num_kv_blocks,
            "kv_cache_bytes": info.kv_cache_bytes,
            "attention_backend": info.attention_backend,
            "max_total_tokens": info.max_model_len,
            "max_input_tokens": info.max_input_tokens,
            "max_total_tokens_limited_by": info.context_limited_by,
            "startup_seconds": round(time.monotonic() - started, 2),
            "phase_seconds": phases.summary(),
        },
    )

    def _on_signal(signum: int, _frame: Any) -> None:
        logger.info("engine stopping", extra={"signal": signum})
        server.stop()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    server.run()
    io.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
