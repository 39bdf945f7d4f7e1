"""OpenAI routes: `/v1/chat/completions` and `/v1/completions`, as one JSON body or SSE chunks + `[DONE]`.

The handlers take an already decoded body so `/invocations` can dispatch to them too.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TypeVar

from flask import Blueprint, Response, request

from serve import responses
from serve.context import current_record, current_state, json_response, read_json, set_dialect
from serve.errors import ApiError, Dialect, ErrorKind
from serve.logging_setup import RequestRecord
from serve.schemas import parse_body, resolve_max_new_tokens
from serve.schemas_openai import ChatCompletionRequest, CompletionRequest
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


def _start(body: object, schema: type[RequestT]) -> tuple[ServeState, RequestRecord, RequestT]:
    """The common start of an OpenAI generation: the error dialect, the body parsed and checked, the log record."""
    set_dialect(Dialect.OPENAI)
    state, record = current_state(), current_record()
    record.is_generation = True
    req = parse_body(schema, body, Dialect.OPENAI)
    req.check(state.settings)
    record.stream = bool(req.stream)
    return state, record, req


def handle_chat(body: object) -> Response:
    state, record, req = _start(body, ChatCompletionRequest)
    tokenizer, limits = state.tokenizer(), state.limits()
    prompt = tokenizer.apply_chat_template(req.template_messages())
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    record.prompt_tokens = len(prompt_ids)
    max_tokens = resolve_max_new_tokens(len(prompt_ids), req.requested_max_tokens(), limits, Dialect.OPENAI)
    specs = [
        SequenceSpec(prompt_ids, req.to_sampling_params(max_tokens, choice), req.seed)
        for choice in range(req.num_choices)
    ]
    job = state.start_job(record, specs, req.stop_list, include_stop=False)
    reply = responses.OpenAIReply(model=state.model_name(), object_prefix="chatcmpl")
    if req.stream:
        events = _chat_stream(job, reply, req, tokenizer, len(prompt_ids))
        return sse_response(guarded_events(job, events, Dialect.OPENAI), job.close)
    try:
        job.collect(request.environ)
    finally:
        job.close()
    return json_response(responses.chat_completion(reply, job.generations, tokenizer, bool(req.logprobs)))


def _chat_stream(
    job: Job, reply: responses.OpenAIReply, req: ChatCompletionRequest, tokenizer: TextTokenizer, num_prompt: int
) -> Iterator[bytes]:
    include_usage = req.include_usage
    for generation in job.generations:
        delta = {"role": "assistant", "content": ""}
        yield sse_data(responses.chat_chunk(reply, generation.index, delta, include_usage=include_usage))
    for update in job.updates():
        delta = {"content": update.text} if update.text else {}
        logprobs = responses.chat_logprobs(tokenizer, update.tokens) if req.logprobs and update.tokens else None
        finish = update.finish.openai if update.finish is not None else None
        if not delta and logprobs is None and finish is None:
            continue
        yield sse_data(responses.chat_chunk(reply, update.index, delta, finish, logprobs, include_usage))
    if include_usage:
        usage = responses.usage(job.generations, num_prompt)
        yield sse_data(responses.usage_chunk(reply, "chat.completion.chunk", usage))
    yield SSE_DONE


def handle_completions(body: object) -> Response:
    state, record, req = _start(body, CompletionRequest)
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
    specs = []
    for ids in prompt_ids:
        max_tokens = resolve_max_new_tokens(len(ids), req.max_tokens, limits, Dialect.OPENAI, "prompt")
        if req.max_tokens is None:  # OpenAI's (and vLLM's) default for completions, where the context has room
            max_tokens = min(max_tokens, max(COMPLETION_DEFAULT_MAX_TOKENS, req.min_tokens or 0))
        specs += [SequenceSpec(ids, req.to_sampling_params(max_tokens, c), req.seed) for c in range(req.num_choices)]
    record.prompt_tokens = sum(len(ids) for ids in prompt_ids)
    job = state.start_job(record, specs, req.stop_list, include_stop=False)
    reply = responses.OpenAIReply(model=state.model_name(), object_prefix="cmpl")
    echoes = [prompt_texts[i // req.num_choices] if req.echo else "" for i in range(len(specs))]
    if req.stream:
        events = _completion_stream(job, reply, req, tokenizer, echoes)
        return sse_response(guarded_events(job, events, Dialect.OPENAI), job.close)
    try:
        job.collect(request.environ)
    finally:
        job.close()
    choices = []
    for g in job.generations:
        prefix = echoes[g.index]
        logprobs = None if req.logprobs is None else responses.completion_logprobs(tokenizer, g.tokens, len(prefix))
        finish = g.finish.openai if g.finish else "stop"
        choices.append(responses.completion_choice(g.index, prefix + g.text, finish, logprobs))
    usage = responses.usage(job.generations, record.prompt_tokens)
    return json_response(responses.completion(reply, choices, usage))


def _completion_stream(
    job: Job, reply: responses.OpenAIReply, req: CompletionRequest, tokenizer: TextTokenizer, echoes: list[str]
) -> Iterator[bytes]:
    include_usage = req.include_usage
    offsets = [len(echo) for echo in echoes]
    for generation in job.generations:
        if echoes[generation.index]:
            choice = responses.completion_choice(generation.index, echoes[generation.index], None, None)
            yield sse_data(responses.completion_chunk(reply, choice, include_usage))
    for update in job.updates():
        logprobs = None
        if req.logprobs is not None and update.tokens:
            logprobs = responses.completion_logprobs(tokenizer, update.tokens, offsets[update.index])
        offsets[update.index] += len(update.text)
        finish = update.finish.openai if update.finish is not None else None
        if not update.text and logprobs is None and finish is None:
            continue
        choice = responses.completion_choice(update.index, update.text, finish, logprobs)
        yield sse_data(responses.completion_chunk(reply, choice, include_usage))
    if include_usage:
        usage = responses.usage(job.generations, job.record.prompt_tokens)
        yield sse_data(responses.usage_chunk(reply, "text_completion", usage))
    yield SSE_DONE
