"""The records that cross the seam between the HTTP workers and the engine process.

Token ids only: the HTTP side owns text. Every message is a small slotted dataclass, pickled over a
local ZeroMQ socket (see `model_handler/server.py` and `serve/engine_client.py`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from model_handler.sampling_params import SamplingParams


class FinishReason(enum.Enum):
    """Why the engine stopped a request. The HTTP side maps it to OpenAI's or TGI's spelling."""

    EOS = "eos_token"
    STOP_TOKEN = "stop_token"
    LENGTH = "length"
    ABORTED = "aborted"
    ERROR = "error"


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
    """New tokens of one request from one engine step; `finished` is set on its last output."""

    request_id: str
    new_token_ids: list[int]
    finished: bool = False
    finish_reason: FinishReason | None = None
    new_logprobs: list[TokenLogprob] | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    """Prompt tokens whose KV came from the prefix cache instead of being computed."""
    error: str | None = None


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
