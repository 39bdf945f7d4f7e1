"""The seam between the HTTP workers and the engine process: every message that crosses it, and what each side
relies on from the other (`EngineClient` for the HTTP side, `StepEngine` for the engine server).

Token ids only: the HTTP side owns text. Every message is a small slotted dataclass, pickled over a local ZeroMQ
socket (`model_handler/server.py`, `serve/engine_client.py`). No torch here: the HTTP workers import this module.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from model_handler.sampling_params import SamplingParams


class FinishReason(enum.Enum):
    """Why the engine stopped a request. The HTTP side maps it to OpenAI's or TGI's spelling."""

    EOS = "eos_token"
    STOP_TOKEN = "stop_token"
    LENGTH = "length"
    ABORTED = "aborted"
    REJECTED = "rejected"
    """The engine refused the request before running it (it could never fit, its constraint does not compile):
    the client's to fix, a 4xx."""
    ERROR = "error"
    """The engine failed while running it: a 5xx."""

    @property
    def is_failure(self) -> bool:
        return self is FinishReason.REJECTED or self is FinishReason.ERROR


@dataclass(slots=True)
class EngineRequest:
    """A tokenized prompt and how to continue it."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float = 0.0


@dataclass(slots=True)
class TokenLogprob:
    """The chosen token's logprob and, when asked, the top alternatives as (token_id, logprob)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass(slots=True)
class RequestOutput:
    """New tokens of one request from one engine step; its last output has a finish reason."""

    request_id: str
    new_token_ids: list[int]
    finish_reason: FinishReason | None = None
    new_logprobs: list[TokenLogprob] | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    """Prompt tokens whose KV came from the prefix cache instead of being computed."""
    failure_message: str = ""
    """Why, when the finish reason is a failure (REJECTED, ERROR); empty otherwise."""
    prompt_logprobs: list[TokenLogprob] | None = None
    """Requests with `prompt_logprobs`: the logprobs of prompt tokens 1..n-1 (the first has none), sent once,
    with the request's first token."""

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @classmethod
    def failure(cls, request_id: str, reason: FinishReason, message: str) -> RequestOutput:
        """The last output of a request the engine refused or failed."""
        if not reason.is_failure:
            raise ValueError(f"{reason} is not a failure")
        return cls(request_id, [], finish_reason=reason, failure_message=message)


# ---- messages on the socket -------------------------------------------------------------------


@dataclass(slots=True)
class AbortRequests:
    """Stop these requests and free their KV blocks (client gone, stop string hit)."""

    request_ids: list[str]


@dataclass(slots=True)
class Hello:
    """First message of an HTTP worker, so the engine knows where to send heartbeats."""

    worker_pid: int


@dataclass(slots=True)
class EngineInfo:
    """What the engine tells the HTTP side about itself (shown in /info, used for limits)."""

    model_id: str
    model_dir: str
    architecture: str
    dtype: str
    device: str
    max_model_len: int
    """Prompt + generated tokens of one request (MAX_TOTAL_TOKENS, or sized from the KV cache and the model)."""
    max_input_tokens: int
    """Longest prompt (MAX_INPUT_TOKENS, or max_model_len - 1)."""
    block_size: int
    num_kv_blocks: int
    kv_cache_bytes: int
    max_num_seqs: int
    max_num_prefill_tokens: int
    eos_token_ids: list[int]
    vocab_size: int
    attention_backend: str
    cuda_graphs: bool
    prefix_caching: bool
    tensor_parallel_size: int = 1
    grammar_backend: str = ""
    """What compiles output constraints ("xgrammar 0.2.9"); empty when the engine's image lacks it, and then
    every constrained request is REJECTED."""
    max_position_embeddings: int = 0
    """The model's own context limit; max_model_len is at most this."""
    context_limited_by: str = ""
    """What set max_model_len: "model", "kv_cache" (MAX_TOTAL_TOKENS unset) or "MAX_TOTAL_TOKENS"."""
    sampling_defaults: dict[str, float] = field(default_factory=dict)
    """The model's own `temperature`, `top_p`, `top_k`, `min_p`, `repetition_penalty` (generation_config.json,
    GENERATION_CONFIG), for requests that leave them unset; empty when it has none."""


@dataclass(slots=True)
class Heartbeat:
    """Sent to every known worker about once a second; `/ping` is healthy while these keep coming."""

    ready: bool
    info: EngineInfo | None = None
    error: str | None = None
    num_running: int = 0
    num_waiting: int = 0
    num_free_blocks: int = 0


@dataclass(slots=True)
class OutputBatch:
    """Everything one engine step produced for one worker, sent as a single message."""

    outputs: list[RequestOutput]


# ---- what each side relies on ------------------------------------------------------------------


@runtime_checkable
class OutputStream(Protocol):
    """The outputs of one submitted request, in order, until one is finished."""

    request_id: str

    def __iter__(self) -> Iterator[RequestOutput]: ...

    def close(self) -> None:
        """Abort the request unless it already finished (client gone, stop string hit)."""


@runtime_checkable
class EngineClient(Protocol):
    """What the HTTP side needs from its connection to the engine (`serve/engine_client.py`; tests script one)."""

    @property
    def info(self) -> EngineInfo | None:
        """The engine's description from its heartbeats; None until the first one."""

    @property
    def last_heartbeat(self) -> Heartbeat | None: ...

    def is_ready(self) -> bool:
        """The engine's last heartbeat is recent and says ready."""

    def submit(self, request: EngineRequest) -> OutputStream: ...

    def fail_in_flight(self, make_error: Callable[[], Exception]) -> None:
        """End every request in flight: each stream raises an error of `make_error()` where its outputs are read,
        and the engine aborts them (the server is stopping)."""


@runtime_checkable
class StepEngine(Protocol):
    """What the engine process's step loop (`model_handler/server.py`) needs from an engine."""

    def info(self) -> EngineInfo: ...

    def add_request(self, request: EngineRequest) -> None:
        """Queue a request; ValueError when it can never run (the server answers it REJECTED)."""

    def abort_requests(self, request_ids: list[str]) -> None: ...

    def step(self) -> list[RequestOutput]: ...

    def has_unfinished_requests(self) -> bool: ...

    def has_ready_requests(self) -> bool:
        """`step()` has work now; False while the only unfinished requests wait for their grammar to compile."""

    def set_wakeup(self, wakeup: Callable[[], None]) -> None:
        """Have `wakeup` called, from another thread, when a request that was not ready becomes ready."""

    def stats(self) -> tuple[int, int, int]:
        """(num_running, num_waiting, num_free_blocks)."""
