"""OpenAI routes: `/v1/chat/completions` and `/v1/completions`, as one JSON body or SSE chunks + `[DONE]`.

The handlers take an already decoded body so `/invocations` can dispatch to them too.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TypeVar

from flask import Blueprint, Response, request

from serve import responses
from serve.chat_output import ChoiceOutput
from serve.chat_plan import plan_chat
from serve.context import current_record, current_state, json_response, read_json, set_dialect
from serve.errors import ApiError, Dialect, ErrorKind
from serve.logging_setup import RequestRecord
from serve.schemas import parse_body, resolve_max_new_tokens
from serve.schemas_openai import ChatCompletionRequest, CompletionRequest
from serve.served_model import ServedModel
from serve.state import Job, SequenceSpec, ServeState
from serve.streaming import SSE_DONE, guarded_events, sse_data, sse_response
from serve.tokenizer import TextTokenizer

blueprint = Blueprint("openai", __name__)

COMPLETION_DEFAULT_MAX_TOKENS = 16
"""`max_tokens` of a completion that names none (OpenAI's documented default; chat has none and fills the context)."""


@blueprint.post("/v1/chat/completions")
def chat_completions_route() -> Response:
    return handle_chat(read_json())


@blueprint.post("/v1/completions")
def completions_route() -> Response:
    return handle_completions(read_json())


RequestT = TypeVar("RequestT", ChatCompletionRequest, CompletionRequest)


def _start(body: object, schema: type[RequestT]) -> tuple[ServeState, RequestRecord, RequestT, ServedModel]:
    """The common start of an OpenAI generation: the error dialect, the body parsed and checked (against the
    served model too), the log record."""
    set_dialect(Dialect.OPENAI)
    state, record = current_state(), current_record()
    record.is_generation = True
    req = parse_body(schema, body, Dialect.OPENAI)
    req.check(state.settings)
    served = state.served_model()
    req.check_model(served)
    record.stream = bool(req.stream)
    record.client = req.client_tags
    return state, record, req, served


def handle_chat(body: object) -> Response:
    state, record, req, served = _start(body, ChatCompletionRequest)
    tokenizer, limits = state.tokenizer(), state.limits()
    plan = plan_chat(req, tokenizer, state.tool_support())
    prompt_ids = tokenizer.encode(plan.prompt, add_special_tokens=False)
    record.prompt_tokens = len(prompt_ids)
    max_tokens = resolve_max_new_tokens(len(prompt_ids), req.requested_max_tokens(), limits, Dialect.OPENAI)
    specs = [
        SequenceSpec(prompt_ids, req.to_sampling_params(max_tokens, served, choice, plan.constraint), req.seed)
        for choice in range(req.num_choices)
    ]
    job = state.start_job(record, specs, req.stop_list, include_stop=False, visible_ids=plan.visible_ids)
    reply = responses.OpenAIReply(model=state.model_name(), object_prefix="chatcmpl")
    outputs = [ChoiceOutput(plan.shape) for _ in specs]
    if req.stream:
        events = _chat_stream(job, reply, req, tokenizer, len(prompt_ids), outputs)
        return sse_response(guarded_events(job, events, Dialect.OPENAI), job.close)
    try:
        job.collect(request.environ)
    finally:
        job.close()
    for generation, output in zip(job.generations, outputs, strict=True):
        output.feed(generation.text)
        output.finish()
    return json_response(responses.chat_completion(reply, job.generations, tokenizer, bool(req.logprobs), outputs))


def _chat_stream(
    job: Job,
    reply: responses.OpenAIReply,
    req: ChatCompletionRequest,
    tokenizer: TextTokenizer,
    num_prompt: int,
    outputs: list[ChoiceOutput],
) -> Iterator[bytes]:
    include_usage = req.include_usage

    def usage_so_far() -> dict | None:
        return responses.usage(job.generations, num_prompt) if req.continuous_usage else None

    for generation in job.generations:
        # OpenAI's first delta: content "" for a text reply, null for a reply of calls only
        delta = {"role": "assistant", "content": None if outputs[generation.index].shape.calls_only else ""}
        chunk = responses.chat_chunk(reply, generation.index, delta, None, None, include_usage, usage_so_far())
        yield sse_data(chunk)
    for update in job.updates():
        output = outputs[update.index]
        deltas = output.feed(update.text)
        if update.finish is not None:
            deltas += output.finish()
        logprobs = responses.chat_logprobs(tokenizer, update.tokens) if req.logprobs and update.tokens else None
        finish = output.finish_reason(update.finish.openai) if update.finish is not None else None
        if finish is not None and (not deltas or "tool_calls" in deltas[-1]):
            deltas.append({})  # the finish in a chunk of its own after a call's deltas, as OpenAI sends it
        if not deltas and logprobs is not None:
            deltas.append({})
        for position, delta in enumerate(deltas):
            is_last = position == len(deltas) - 1
            chunk_logprobs = logprobs if position == 0 else None
            chunk = responses.chat_chunk(
                reply, update.index, delta, finish if is_last else None, chunk_logprobs, include_usage, usage_so_far()
            )
            yield sse_data(chunk)
    if include_usage:
        usage = responses.usage(job.generations, num_prompt)
        yield sse_data(responses.usage_chunk(reply, "chat.completion.chunk", usage))
    yield SSE_DONE


def handle_completions(body: object) -> Response:
    state, record, req, served = _start(body, CompletionRequest)
    tokenizer, limits = state.tokenizer(), state.limits()
    prompt_ids, prompt_texts = [], []
    for prompt in req.prompts():
        if isinstance(prompt, str):
            ids = tokenizer.encode(prompt, add_special_tokens=True)
            prompt_texts.append(prompt)
        else:
            if any(not 0 <= token_id < tokenizer.vocab_size for token_id in prompt):
                raise ApiError(ErrorKind.VALIDATION, "Invalid 'prompt': token id out of the vocabulary.", "prompt")
            ids = list(prompt)
            prompt_texts.append(tokenizer.decode(ids, skip_special_tokens=False))
        prompt_ids.append(ids)
    # An echo of the prompt alone (max_tokens 0) still runs one engine step: it computes the prompt's logprobs.
    requested = 1 if req.echo_only else req.max_tokens
    specs = []
    for ids in prompt_ids:
        max_tokens = resolve_max_new_tokens(len(ids), requested, limits, Dialect.OPENAI, "prompt")
        if req.max_tokens is None:  # OpenAI's (and vLLM's) default for completions, where the context has room
            max_tokens = min(max_tokens, max(COMPLETION_DEFAULT_MAX_TOKENS, req.min_tokens or 0))
        specs += [
            SequenceSpec(ids, req.to_sampling_params(max_tokens, served, c), req.seed) for c in range(req.num_choices)
        ]
    record.prompt_tokens = sum(len(ids) for ids in prompt_ids)
    job = state.start_job(record, specs, req.stop_list, include_stop=False)
    reply = responses.OpenAIReply(model=state.model_name(), object_prefix="cmpl")
    echo = _Echo(
        req, tokenizer, [prompt_texts[i // req.num_choices] for i in range(len(specs))], [s.prompt_ids for s in specs]
    )
    if req.stream:
        events = _completion_stream(job, reply, req, tokenizer, echo)
        return sse_response(guarded_events(job, events, Dialect.OPENAI), job.close)
    try:
        job.collect(request.environ)
    finally:
        job.close()
    choices = []
    for g in job.generations:
        text, logprobs, finish = echo.first_part(g, g.tokens, g.text, g.finish.openai if g.finish else "stop")
        choices.append(responses.completion_choice(g.index, text, finish, logprobs))
    usage = responses.usage(job.generations, record.prompt_tokens, generated=not req.echo_only)
    return json_response(responses.completion(reply, choices, usage))


class _Echo:
    """What `echo` puts in front of a choice's generated text and logprobs: the prompt, its tokens' logprobs
    (the first one's null); `max_tokens: 0` keeps the prompt alone (finish reason `length`)."""

    def __init__(
        self, req: CompletionRequest, tokenizer: TextTokenizer, texts: list[str], prompt_ids: list[list[int]]
    ) -> None:
        self.req, self.tokenizer = req, tokenizer
        self.texts = texts if req.echo else [""] * len(texts)
        self.prompt_ids = prompt_ids

    def first_part(self, g, tokens: list, text: str, finish: str | None) -> tuple[str, dict | None, str | None]:
        """(text, logprobs, finish reason) of a choice's first chunk, or of its whole reply, with the echo."""
        req, prefix = self.req, self.texts[g.index]
        logprobs = None
        if req.logprobs is not None:
            logprobs = responses.completion_logprobs(self.tokenizer, tokens, len(prefix))
            if req.echo:
                ids = self.prompt_ids[g.index]
                prompt_part = responses.prompt_completion_logprobs(self.tokenizer, ids, g.prompt_logprobs)
                logprobs = prompt_part if req.echo_only else responses.join_completion_logprobs(prompt_part, logprobs)
        if req.echo_only:
            return prefix, logprobs, "length"
        return prefix + text, logprobs, finish


def _completion_stream(
    job: Job, reply: responses.OpenAIReply, req: CompletionRequest, tokenizer: TextTokenizer, echo: _Echo
) -> Iterator[bytes]:
    """Chunks of each choice; an echo comes in front of the choice's first chunk, as vLLM streams it."""
    include_usage = req.include_usage
    offsets = [len(text) for text in echo.texts]
    started = [False] * len(job.generations)

    def usage_so_far() -> dict | None:
        if not req.continuous_usage:
            return None
        return responses.usage(job.generations, job.record.prompt_tokens, generated=not req.echo_only)

    for update in job.updates():
        i = update.index
        finish = update.finish.openai if update.finish is not None else None
        if not started[i]:
            started[i] = True
            text, logprobs, finish = echo.first_part(job.generations[i], update.tokens, update.text, finish)
        elif req.echo_only:
            continue  # the one step an echo alone runs ends it
        else:
            text, logprobs = update.text, None
            if req.logprobs is not None and update.tokens:
                logprobs = responses.completion_logprobs(tokenizer, update.tokens, offsets[i])
        offsets[i] += len(update.text)
        if not text and logprobs is None and finish is None:
            continue
        choice = responses.completion_choice(i, text, finish, logprobs)
        yield sse_data(responses.completion_chunk(reply, choice, include_usage, usage_so_far()))
    if include_usage:
        usage = responses.usage(job.generations, job.record.prompt_tokens, generated=not req.echo_only)
        yield sse_data(responses.usage_chunk(reply, "text_completion", usage))
    yield SSE_DONE
