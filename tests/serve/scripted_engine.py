"""An EngineClient stand-in that replays chosen token ids, for outcomes the real engine cannot be made to produce
on demand (a character split over tokens at a chosen point, an engine error mid-generation), and as a spy for
the checks that must stop a request before it is queued.

Everything else in the request path (routes, tokenizer, detokenizer, stop strings, SSE) is the real code.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from model_handler.engine_protocol import (
    EngineInfo,
    EngineRequest,
    FinishReason,
    Heartbeat,
    RequestOutput,
    TokenLogprob,
)

Script = Callable[[EngineRequest], list]
"""Given a request, the items its stream yields: RequestOutputs, or an exception to raise at that point."""


def engine_info(
    model_dir: str,
    max_model_len: int = 2048,
    model_id: str = "tiny-llama",
    max_input_tokens: int | None = None,
    sampling_defaults: dict | None = None,
) -> EngineInfo:
    return EngineInfo(
        model_id=model_id,
        model_dir=model_dir,
        architecture="LlamaForCausalLM",
        dtype="float32",
        device="cpu",
        max_model_len=max_model_len,
        max_input_tokens=max_input_tokens if max_input_tokens is not None else max_model_len - 1,
        block_size=16,
        num_kv_blocks=64,
        kv_cache_bytes=1 << 20,
        max_num_seqs=8,
        max_num_prefill_tokens=2048,
        eos_token_ids=[2],
        vocab_size=4096,
        attention_backend="torch",
        cuda_graphs=False,
        prefix_caching=True,
        sampling_defaults=sampling_defaults or {},
    )


def outputs_for(
    request: EngineRequest,
    token_ids: list[int],
    finish: FinishReason = FinishReason.LENGTH,
    per_step: int = 1,
    error: str | None = None,
) -> list[RequestOutput]:
    """One RequestOutput per `per_step` tokens, the last one finished; logprobs (and the prompt's, with the first
    output) when the request asked."""
    k = request.sampling_params.logprobs
    num_prompt = len(request.prompt_token_ids)
    outputs = []
    for start in range(0, len(token_ids), per_step):
        ids = token_ids[start : start + per_step]
        logprobs = None
        if k is not None:
            logprobs = [TokenLogprob(i, -0.25, [(i, -0.25), (7, -1.5), (8, -2.0)][:k]) for i in ids]
        outputs.append(RequestOutput(request.request_id, ids, new_logprobs=logprobs, num_prompt_tokens=num_prompt))
    if not outputs:
        outputs.append(RequestOutput(request.request_id, [], num_prompt_tokens=num_prompt))
    prompt_k = request.sampling_params.prompt_logprobs
    if prompt_k is not None and num_prompt > 1:
        scored = request.prompt_token_ids[1:]
        outputs[0].prompt_logprobs = [TokenLogprob(i, -1.0, [(i, -1.0), (7, -2.5)][:prompt_k]) for i in scored]
    outputs[-1].finish_reason = FinishReason.ERROR if error else finish
    outputs[-1].failure_message = error or ""
    return outputs


class ScriptedStream:
    def __init__(self, engine: ScriptedEngine, request: EngineRequest, items: list) -> None:
        self.request_id = request.request_id
        self._engine = engine
        self._items = items
        self.finished = False
        self.failure: Exception | None = None

    def __iter__(self) -> Iterator[RequestOutput]:
        for item in self._items:
            if self.failure is not None:
                self.finished = True
                raise self.failure
            if self.finished:
                return
            if isinstance(item, BaseException):
                self.finished = True
                raise item
            if item.finished:
                self.finished = True
            self._engine.steps += 1
            yield item

    def close(self) -> None:
        if not self.finished:
            self.finished = True
            self._engine.aborted.append(self.request_id)


@dataclass
class ScriptedEngine:
    info: EngineInfo
    script: Script
    ready: bool = True
    submitted: list[EngineRequest] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)
    streams: list[ScriptedStream] = field(default_factory=list)
    steps: int = 0

    def is_ready(self) -> bool:
        return self.ready

    def with_limits(self, max_total_tokens: int, max_input_tokens: int | None = None) -> ScriptedEngine:
        """This engine, now reporting these token limits (what MAX_TOTAL_TOKENS, MAX_INPUT_TOKENS give it)."""
        self.info = engine_info(self.info.model_dir, max_total_tokens, self.info.model_id, max_input_tokens)
        return self

    @property
    def last_heartbeat(self) -> Heartbeat:
        return Heartbeat(ready=self.ready, info=self.info, num_running=0, num_waiting=0, num_free_blocks=64)

    def submit(self, request: EngineRequest) -> ScriptedStream:
        self.submitted.append(request)
        stream = ScriptedStream(self, request, self.script(request))
        self.streams.append(stream)
        return stream

    def fail_in_flight(self, make_error: Callable[[], Exception]) -> None:
        for stream in self.streams:
            if not stream.finished:
                stream.failure = make_error()
                self.aborted.append(stream.request_id)
