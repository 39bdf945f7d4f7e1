"""TGI routes: `/generate`, `/generate_stream` and `POST /` (compat_generate), in TGI's exact shapes.

`handle_generate` also serves TGI-shaped `/invocations` bodies (list-wrapped reply, full text by default).
"""

from __future__ import annotations

import enum
import time
from collections.abc import Iterator

from flask import Blueprint, Response, request

from serve import responses
from serve.context import current_record, current_state, json_response, read_json, set_dialect
from serve.errors import ApiError, Dialect, ErrorKind
from serve.generation import Generation
from serve.schemas import parse_body, resolve_max_new_tokens
from serve.schemas_tgi import GenerateRequest
from serve.state import Job, SequenceSpec
from serve.streaming import guarded_events, sse_data, sse_response
from serve.tokenizer import TextTokenizer

blueprint = Blueprint("tgi", __name__)


class GenerateMode(enum.Enum):
    GENERATE = "generate"
    STREAM = "generate_stream"
    COMPAT = "compat"
    """`POST /` and `/invocations`: the body's `stream` decides; a JSON reply is a one-element list."""


@blueprint.post("/generate")
def generate_route() -> Response:
    return handle_generate(read_json(), GenerateMode.GENERATE)


@blueprint.post("/generate_stream")
def generate_stream_route() -> Response:
    return handle_generate(read_json(), GenerateMode.STREAM)


@blueprint.post("/")
def compat_generate_route() -> Response:
    return handle_generate(read_json(), GenerateMode.COMPAT)


def handle_generate(body: object, mode: GenerateMode) -> Response:
    set_dialect(Dialect.TGI)
    state, record = current_state(), current_record()
    record.is_generation = True
    req = parse_body(GenerateRequest, body, Dialect.TGI)
    streaming = mode is GenerateMode.STREAM or (mode is GenerateMode.COMPAT and req.stream)
    record.stream = streaming
    req.check(state.settings, streaming)
    params = req.parameters
    served = state.served_model()
    served.check_adapter(params.adapter_id)
    tokenizer, limits = state.tokenizer(), state.limits()
    req.check_truncate(limits.max_input_tokens)
    prompt_ids = tokenizer.encode(req.inputs, add_special_tokens=req.add_special_tokens)
    if params.truncate is not None:
        prompt_ids = prompt_ids[-params.truncate :]
    record.prompt_tokens = len(prompt_ids)
    max_new = resolve_max_new_tokens(len(prompt_ids), params.max_new_tokens, limits, Dialect.TGI)
    constraint = req.constraint()
    specs = [
        SequenceSpec(prompt_ids, req.to_sampling_params(max_new, seed, served, constraint), seed)
        for seed in req.seeds()
    ]
    # TGI prepends the prompt on `/` and `/invocations` unless told otherwise (text-generation models).
    full_text = params.return_full_text if params.return_full_text is not None else mode is GenerateMode.COMPAT
    prefix = req.inputs if full_text else ""
    job = state.start_job(record, specs, params.stop, include_stop=True)
    top_n = params.top_n_tokens or 0
    if streaming:
        events = _generate_stream(job, tokenizer, prefix, params.details, top_n)
        return sse_response(guarded_events(job, events, Dialect.TGI), job.close, _headers(state))
    try:
        job.collect(request.environ)
    finally:
        job.close()
    best = max(job.generations, key=lambda g: g.mean_logprob) if len(job.generations) > 1 else job.generations[0]
    others = [g for g in job.generations if g is not best]
    prefill_ids = prompt_ids if params.decoder_input_details else None
    body_out = responses.tgi_generate_response(tokenizer, best, others, prefix, req.wants_details, top_n, prefill_ids)
    headers = {**_headers(state), **_timing_headers(job, best, len(req.inputs))}
    return json_response([body_out] if mode is GenerateMode.COMPAT else body_out, headers=headers)


def _generate_stream(job: Job, tokenizer: TextTokenizer, prefix: str, details: bool, top_n: int) -> Iterator[bytes]:
    """One event per token, `index` from 1; the last carries `generated_text` (and `details`); no [DONE]."""
    generation = job.generations[0]
    index = 0
    last_token = None
    for update in job.updates():
        tokens = update.tokens
        if update.finish is not None and not tokens and last_token is not None:
            tokens = [last_token]  # the engine ended without a new token: repeat the last one as the final event
            index -= 1
        for position, token in enumerate(tokens):
            index += 1
            last_token = token
            is_last = update.finish is not None and position == len(tokens) - 1
            yield sse_data(
                responses.tgi_stream_event(
                    tokenizer,
                    index,
                    token,
                    top_n,
                    generated_text=prefix + generation.text if is_last else None,
                    details=responses.tgi_stream_details(generation) if is_last and details else None,
                )
            )
        if update.finish is not None and not tokens:
            raise ApiError(ErrorKind.INTERNAL, "Incomplete generation stream")


def _headers(state) -> dict[str, str]:
    return {"x-compute-type": state.settings.compute_type}


def _timing_headers(job: Job, best: Generation, num_characters: int) -> dict[str, str]:
    """TGI's timing headers (ms, except x-compute-time in s); queue time includes the prefill."""
    record = job.record
    end = best.finished_at or time.monotonic()
    first = best.first_token_at or end
    validated = record.validated_at or record.started_at
    total_ms = (end - record.started_at) * 1000
    inference_ms = (end - first) * 1000
    per_token = inference_ms / max(1, best.num_generated - 1)
    return {
        "x-compute-time": f"{(end - validated):.6f}",
        "x-compute-characters": str(num_characters),
        "x-total-time": str(int(total_ms)),
        "x-validation-time": str(int((validated - record.started_at) * 1000)),
        "x-queue-time": str(int((first - validated) * 1000)),
        "x-inference-time": str(int(inference_ms)),
        "x-time-per-token": str(int(per_token)),
        "x-prompt-tokens": str(best.num_prompt_tokens),
        "x-generated-tokens": str(best.num_generated),
    }
