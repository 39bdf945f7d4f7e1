"""What one HTTP worker holds: settings, the engine client, the tokenizer, the admission limit and metrics.

`ServeState.start_job` admits a request (429 past the limit), submits its engine requests and returns a `Job`,
whose `close()` aborts what is unfinished and gives the slot back, however the reply ended. While the worker
stops (`begin_drain`, then `end_in_flight` once the grace period is over) health says 503.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import gevent
import gevent.monkey

from model_handler.engine_protocol import EngineClient, EngineRequest
from model_handler.sampling_params import SamplingParams
from serve.admission import admission_for
from serve.client_watch import run_while_client_stays
from serve.errors import ApiError, ErrorKind
from serve.generation import Generation, Update, merge
from serve.logging_setup import RequestRecord
from serve.metrics import Metrics
from serve.served_model import ServedModel
from serve.settings import Settings, TokenLimits
from serve.tokenizer import TextTokenizer
from serve.tool_formats import MARKER_TOKENS, ToolSupport, detect_tool_support

logger = logging.getLogger("serve.state")


@dataclass(slots=True)
class SequenceSpec:
    """One engine request of a job: which prompt, how to sample, and the seed to report."""

    prompt_ids: list[int]
    params: SamplingParams
    seed: int | None = None


class ServeState:
    def __init__(
        self,
        settings: Settings,
        engine_client: EngineClient | None = None,
        client_factory: Callable[[str], EngineClient] | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self._engine = engine_client
        self._client_factory = client_factory
        self._tokenizer: TextTokenizer | None = None
        self._tokenizer_error: str | None = None
        self._tool_support: ToolSupport | None = None
        self._limits: TokenLimits | None = None
        self._served: ServedModel | None = None
        self._lock = threading.Lock()
        self._load_lock = threading.Lock()  # held for the ~1 s tokenizer load only
        self._in_flight = 0  # this worker's, for /metrics; the admission counts the whole server's
        self._draining = False
        self._ended = False
        self._admission = admission_for(settings.max_concurrent_requests, settings.admission_file)

    # ---- engine and model ----------------------------------------------------------------------

    @property
    def engine(self) -> EngineClient | None:
        """The engine client, created on first use in this worker (after gunicorn's fork)."""
        if self._engine is None and self.settings.engine_address:
            with self._lock:
                if self._engine is None:
                    factory = self._client_factory or _default_client_factory
                    self._engine = factory(self.settings.engine_address)
                    gevent.spawn(self._warm_up)
        return self._engine

    def _warm_up(self) -> None:
        """Load the tokenizer as soon as the engine is ready, so the first request does not pay for it."""
        while self._tokenizer is None and self._tokenizer_error is None:
            if self._engine.is_ready() and self._engine.info is not None:
                try:
                    self.tokenizer()
                except ApiError:
                    pass
                return
            gevent.sleep(0.2)

    def is_healthy(self) -> bool:
        """Instant: the engine's last heartbeat says ready, the tokenizer did not fail to load, and the worker is
        not stopping."""
        engine = self.engine
        return engine is not None and engine.is_ready() and self._tokenizer_error is None and not self._draining

    # ---- stopping ------------------------------------------------------------------------------

    def begin_drain(self) -> None:
        """SIGTERM: health turns 503; requests already accepted are still served."""
        self._draining = True

    def end_in_flight(self) -> None:
        """The grace period is over: every request still waiting on the engine ends with a 503 (an error event in
        a stream), and requests not yet submitted are refused."""
        self._ended = True
        if self._engine is not None:
            message = f"the server is shutting down (SHUTDOWN_GRACE_PERIOD={self.settings.shutdown_grace_s} s ended)"
            self._engine.fail_in_flight(lambda: ApiError(ErrorKind.NOT_READY, message))

    def tokenizer(self) -> TextTokenizer:
        """The model's tokenizer, loaded once when the engine first reports ready; 503 before that."""
        if self._tokenizer is not None:
            return self._tokenizer
        engine = self.engine
        if engine is None or not engine.is_ready() or engine.info is None:
            raise ApiError(ErrorKind.NOT_READY, "the model is not ready yet")
        with self._load_lock:
            if self._tokenizer is None:
                try:
                    self._tokenizer = _load_tokenizer(engine.info.model_dir)
                except Exception as exc:
                    self._tokenizer_error = f"{type(exc).__name__}: {exc}"
                    logger.exception("could not load the tokenizer", extra={"model_dir": engine.info.model_dir})
                    raise ApiError(ErrorKind.INTERNAL, f"could not load the tokenizer: {exc}") from exc
        return self._tokenizer

    def tool_support(self) -> ToolSupport:
        """The model's tool-call format (TOOL_CALL_PARSER, else detected from its chat template and tokens)."""
        if self._tool_support is None:
            tokenizer = self.tokenizer()
            markers = {token for token in MARKER_TOKENS if tokenizer.token_id(token) is not None}
            template = tokenizer.chat_template_source
            self._tool_support = detect_tool_support(template, markers, self.settings.tool_call_parser)
        return self._tool_support

    def limits(self) -> TokenLimits:
        if self._limits is None:
            engine = self.engine
            if engine is None or engine.info is None:
                raise ApiError(ErrorKind.NOT_READY, "the model is not ready yet")
            self._limits = TokenLimits.of(engine.info)
        return self._limits

    def model_name(self) -> str:
        if self.settings.served_model_name:
            return self.settings.served_model_name.split(",")[0].strip()
        engine = self.engine
        info = engine.info if engine is not None else None
        return info.model_id if info is not None else "unknown"

    def served_model(self) -> ServedModel:
        """The model's names, vocabulary size and sampling defaults, from the engine's description; 503 before."""
        if self._served is None:
            engine = self.engine
            if engine is None or engine.info is None:
                raise ApiError(ErrorKind.NOT_READY, "the model is not ready yet")
            self._served = ServedModel.from_info(engine.info, self.settings.served_model_name)
        return self._served

    # ---- requests ------------------------------------------------------------------------------

    @property
    def num_in_flight(self) -> int:
        return self._in_flight

    def start_job(
        self,
        record: RequestRecord,
        specs: list[SequenceSpec],
        stops: list[str],
        include_stop: bool,
        visible_ids: dict[int, str] | None = None,
    ) -> Job:
        """Admit and submit; 503 unless the engine is ready now (the tokenizer, once loaded, no longer asks);
        429 when the server (every worker together) already serves MAX_CONCURRENT_REQUESTS. `visible_ids`: special
        tokens whose text the output keeps (a tool-call marker the reply's parser looks for)."""
        tokenizer = self.tokenizer()
        if self._ended:
            raise ApiError(ErrorKind.NOT_READY, "the server is shutting down")
        if not self.engine.is_ready():  # a dead engine would only fail the request after the heartbeat timeout
            raise ApiError(ErrorKind.NOT_READY, "the model is not ready")
        if not self._admission.try_acquire():
            raise ApiError(ErrorKind.OVERLOADED, "Model is overloaded")
        with self._lock:
            self._in_flight += 1
        self.metrics.in_flight.set(self._in_flight)
        record.validated_at = time.monotonic()
        record.max_new_tokens = max(spec.params.max_tokens for spec in specs)
        generations: list[Generation] = []
        try:
            for index, spec in enumerate(specs):
                request = EngineRequest(
                    request_id=f"{record.request_id}-{index}-{uuid.uuid4().hex[:8]}",
                    prompt_token_ids=spec.prompt_ids,
                    sampling_params=spec.params,
                    arrival_time=time.time(),
                )
                stream = self.engine.submit(request)
                generations.append(
                    Generation(
                        index, stream, tokenizer, stops, include_stop, len(spec.prompt_ids), spec.seed, visible_ids
                    )
                )
        except BaseException:
            for generation in generations:
                generation.close()
            self._release()
            raise
        return Job(self, record, generations)

    def _release(self) -> None:
        self._admission.release()
        with self._lock:
            self._in_flight -= 1
        self.metrics.in_flight.set(self._in_flight)


class Job:
    """The engine requests of one HTTP request; iterate `updates()` or call `collect()`, then `close()`."""

    def __init__(self, state: ServeState, record: RequestRecord, generations: list[Generation]) -> None:
        self.state = state
        self.record = record
        self.generations = generations
        self.abandoned = False
        """The client left before the reply was complete."""
        self._closed = False

    def updates(self) -> Iterator[Update]:
        return merge(self.generations)

    def collect(self, environ: Mapping[str, Any] | None = None) -> list[Generation]:
        """Run every generation to its end; an engine failure raises ApiError (see `Generation.updates`). Given
        the request's WSGI environ, a client that leaves meanwhile ends it with ApiError(CLIENT_GONE)."""
        try:
            run_while_client_stays(self._run_to_end, environ or {})
        except ApiError as error:
            self.abandoned = error.kind is ErrorKind.CLIENT_GONE
            raise
        return self.generations

    def _run_to_end(self) -> None:
        for _update in self.updates():
            pass

    def close(self) -> None:
        """Abort unfinished engine requests, free the admission slot and note tokens (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for generation in self.generations:
            generation.close()
        self.state._release()
        record = self.record
        firsts = [g.first_token_at for g in self.generations if g.first_token_at is not None]
        record.first_token_at = min(firsts) if firsts else None
        record.completion_tokens = sum(g.num_generated for g in self.generations)
        finishes = [g.finish for g in self.generations if g.finish is not None]
        if self.abandoned:
            record.finish_reason = "abandoned"
        else:
            record.finish_reason = finishes[0].value if finishes else "aborted"
        record.is_generation = True


def _load_tokenizer(model_dir: str) -> TextTokenizer:
    """Off the hub in a gevent worker: the ~1 s load (more under load) would otherwise stop the worker accepting
    and answering meanwhile, and a SIGTERM in that window reset the connections still waiting to be accepted.
    (Under monkey-patching `threading.Lock` is gevent's, so the caller's lock waits cooperatively.)"""
    if gevent.monkey.is_module_patched("threading"):
        return gevent.get_hub().threadpool.apply(TextTokenizer.load, (model_dir,))
    return TextTokenizer.load(model_dir)


def _default_client_factory(address: str) -> EngineClient:
    from serve.engine_client import SocketEngineClient

    return SocketEngineClient(address)
