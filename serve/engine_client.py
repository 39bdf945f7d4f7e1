"""The HTTP worker's end of the seam: one ZeroMQ DEALER socket to the engine process, one queue per request.

Everything here is cooperative (gevent + zmq.green), so a greenlet waiting for tokens never blocks the hub.
A reader greenlet routes each step's outputs to the waiting requests; heartbeats from the engine say whether
it is ready. The engine is gone when its end of the socket closes (a ZeroMQ socket monitor sees it at once:
the process exited, whatever killed it) or, failing that, when its heartbeats stop.
"""

from __future__ import annotations

import logging
import os
import pickle
import time
import uuid
from collections.abc import Callable, Iterator

import gevent
import gevent.queue
import zmq.green as zmq
from zmq.utils.monitor import recv_monitor_message

from model_handler.engine_protocol import (
    AbortRequests,
    EngineInfo,
    EngineRequest,
    Heartbeat,
    Hello,
    OutputBatch,
    RequestOutput,
)

logger = logging.getLogger("serve.engine_client")

HEARTBEAT_TIMEOUT_S = 10.0
"""No heartbeat for this long means the engine process is gone (it sends one every 0.5 s)."""


class EngineDeadError(RuntimeError):
    """The engine stopped answering while a request was in flight."""


class RequestStream:
    """The outputs of one engine request, in order; iterate in a greenlet, close when done or abandoned."""

    def __init__(self, client: SocketEngineClient, request_id: str) -> None:
        self.request_id = request_id
        self._client = client
        self._queue: gevent.queue.Queue[RequestOutput | BaseException] = gevent.queue.Queue()
        self.finished = False

    def __iter__(self) -> Iterator[RequestOutput]:
        """Each output as it comes; outputs that queued up meanwhile arrive merged into one.

        A worker that falls behind (many streams at large batches) then pays one wake-up, one event and one
        socket write for several tokens instead of one each, so it catches up instead of lagging further.
        """
        while not self.finished:
            item = self._queue.get()
            while isinstance(item, RequestOutput) and not item.finished and self._queue.qsize():
                following = self._queue.peek_nowait()
                if not isinstance(following, RequestOutput) or not _can_merge(item, following):
                    break
                item = _merged(item, self._queue.get_nowait())
            if isinstance(item, BaseException):
                self.finished = True
                raise item
            if item.finished:
                self.finished = True
            yield item

    def close(self) -> None:
        """Abort the engine request unless it already finished (client gone, stop string hit)."""
        if not self.finished:
            self.finished = True
            self._client.abort(self.request_id)

    def _put(self, item: RequestOutput | BaseException) -> None:
        self._queue.put(item)


def _can_merge(first: RequestOutput, second: RequestOutput) -> bool:
    """Token logprobs line up with token ids only where both outputs carry them for every token, or neither."""
    if first.new_logprobs is None and second.new_logprobs is None:
        return True
    return (
        first.new_logprobs is not None
        and second.new_logprobs is not None
        and len(first.new_logprobs) == len(first.new_token_ids)
        and len(second.new_logprobs) == len(second.new_token_ids)
    )


def _merged(first: RequestOutput, second: RequestOutput) -> RequestOutput:
    """`first` then `second` as one output (the prompt counts and prompt logprobs come with the first output of a
    request). Every field of RequestOutput is combined here: tests/serve/test_engine_client.py checks that."""
    prompt_logprobs = None
    if first.prompt_logprobs is not None or second.prompt_logprobs is not None:
        prompt_logprobs = (first.prompt_logprobs or []) + (second.prompt_logprobs or [])
    return RequestOutput(
        request_id=first.request_id,
        new_token_ids=first.new_token_ids + second.new_token_ids,
        finish_reason=second.finish_reason,
        new_logprobs=None if first.new_logprobs is None else first.new_logprobs + second.new_logprobs,
        num_prompt_tokens=first.num_prompt_tokens or second.num_prompt_tokens,
        num_cached_tokens=first.num_cached_tokens if first.num_prompt_tokens else second.num_cached_tokens,
        failure_message=second.failure_message,
        prompt_logprobs=prompt_logprobs,
    )


class SocketEngineClient:
    """The `EngineClient` of a real engine process; one per HTTP worker, created after the fork (the app does so
    lazily)."""

    def __init__(self, address: str, heartbeat_timeout_s: float = HEARTBEAT_TIMEOUT_S) -> None:
        self.address = address
        self._heartbeat_timeout_s = heartbeat_timeout_s
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.IDENTITY, f"w{os.getpid()}-{uuid.uuid4().hex[:8]}".encode())
        self._socket.setsockopt(zmq.LINGER, 0)
        self._streams: dict[str, RequestStream] = {}
        self._last_heartbeat: Heartbeat | None = None
        self._last_seen = 0.0
        self._info: EngineInfo | None = None
        self._closed = False
        self._gone = False
        self._monitor = self._socket.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
        self._socket.connect(address)
        self._send(Hello(worker_pid=os.getpid()))
        self._reader = gevent.spawn(self._read_loop)
        self._watchdog = gevent.spawn(self._watch_heartbeats)
        self._connection_watch = gevent.spawn(self._watch_connection)

    # ---- state ---------------------------------------------------------------------------------

    def is_ready(self) -> bool:
        hb = self._last_heartbeat
        return hb is not None and hb.ready and self.is_alive()

    def is_alive(self) -> bool:
        """Heartbeats come, and the engine's end of the socket has not closed (for good: it never reopens)."""
        if self._gone:
            return False
        return self._last_seen > 0 and time.monotonic() - self._last_seen < self._heartbeat_timeout_s

    @property
    def info(self) -> EngineInfo | None:
        return self._info

    @property
    def last_heartbeat(self) -> Heartbeat | None:
        return self._last_heartbeat

    def wait_ready(self, timeout_s: float) -> bool:
        """Cooperatively wait until the engine reports ready (tests and start-up checks)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.is_ready():
                return True
            gevent.sleep(0.05)
        return self.is_ready()

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    # ---- requests ------------------------------------------------------------------------------

    def submit(self, request: EngineRequest) -> RequestStream:
        if request.request_id in self._streams:
            raise ValueError(f"request id {request.request_id!r} is already in flight")
        stream = RequestStream(self, request.request_id)
        self._streams[request.request_id] = stream
        self._send(request)
        return stream

    def abort(self, request_id: str) -> None:
        if self._streams.pop(request_id, None) is not None:
            self._send(AbortRequests([request_id]))

    def fail_in_flight(self, make_error: Callable[[], Exception]) -> None:
        """End every request in flight with an error of `make_error` (raised in the greenlet reading it) and
        abort them in the engine."""
        if self._streams:
            self._send(AbortRequests(list(self._streams)))
        self._fail_streams(make_error)

    def close(self) -> None:
        self._closed = True
        for greenlet in (self._reader, self._watchdog, self._connection_watch):
            greenlet.kill(block=False)
        self._socket.disable_monitor()
        self._monitor.close(linger=0)
        self._socket.close(linger=0)
        self._context.term()

    # ---- internals -----------------------------------------------------------------------------

    def _send(self, message: object) -> None:
        self._socket.send(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))

    def _read_loop(self) -> None:
        while not self._closed:
            try:
                message = pickle.loads(self._socket.recv())
            except zmq.ZMQError:
                if self._closed:
                    return
                raise
            if isinstance(message, OutputBatch):
                for output in message.outputs:
                    stream = self._streams.get(output.request_id)
                    if stream is None:
                        continue
                    if output.finished:
                        del self._streams[output.request_id]
                    stream._put(output)
            elif isinstance(message, Heartbeat):
                self._last_heartbeat = message
                self._last_seen = time.monotonic()
                if message.info is not None:
                    self._info = message.info

    def _messages_waiting(self) -> bool:
        """Messages the reader has not taken yet: the engine spoke, this worker was busy (a long blocking call
        held the hub), so the silence is ours, not the engine's."""
        try:
            return bool(self._socket.getsockopt(zmq.EVENTS) & zmq.POLLIN)
        except zmq.ZMQError:
            return False

    def _watch_heartbeats(self) -> None:
        """Fail every waiting request once the engine has been silent too long, instead of hanging them (an
        engine that is alive but stuck: its socket stays open)."""
        while not self._closed:
            gevent.sleep(1.0)
            if self._streams and self._last_seen and not self.is_alive() and not self._messages_waiting():
                logger.error("engine stopped sending heartbeats; failing in-flight requests")
                self._fail_streams(lambda: EngineDeadError("the engine process stopped responding"))

    def _watch_connection(self) -> None:
        """The engine closes its socket only when its process ends, and only the launcher ends it after the HTTP
        workers have stopped: a disconnect while we run means the engine died. Fail everything at once instead
        of after the heartbeat timeout; health says 503 from now on."""
        while not self._closed:
            try:
                event = recv_monitor_message(self._monitor)
            except zmq.ZMQError:
                return
            if event["event"] == zmq.EVENT_DISCONNECTED:
                self._gone = True
                logger.error(
                    "the engine process is gone; failing in-flight requests", extra={"in_flight": len(self._streams)}
                )
                self._fail_streams(lambda: EngineDeadError("the engine process exited"))

    def _fail_streams(self, make_error: Callable[[], Exception]) -> None:
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream._put(make_error())
