"""The small routes: health (`/ping`, `/health`, `GET /`), `/info`, `/v1/models`, `/metrics`, `/tokenize`,
`/chat_tokenize`.

Health answers from the last engine heartbeat only, so it is instant even while the engine is busy or gone.
"""

from __future__ import annotations

from collections.abc import Callable

import gevent
from flask import Blueprint, Response

from serve.chat_plan import plan_chat
from serve.context import current_state, json_response, read_json, set_dialect
from serve.errors import UNHEALTHY_BODY, ApiError, Dialect, ErrorKind
from serve.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from serve.request_checks import refuse_non_text_parts
from serve.responses import SERVER_VERSION
from serve.schemas import parse_body, resolve_max_new_tokens
from serve.schemas_openai import ChatCompletionRequest
from serve.schemas_tgi import GenerateRequest
from serve.streaming import dumps
from serve.tokenizer import token_spans

blueprint = Blueprint("basic", __name__)

PUBLIC_ENDPOINTS = frozenset(
    {
        "basic.ping",
        "basic.health",
        "basic.health_root",
        "basic.info",
        "basic.models",
        "basic.metrics",
        "docs.openapi_document",
        "docs.docs_page",
        "docs.docs_asset",
    }
)
"""Routes served without `API_KEY`; every other route (`/tokenize` and `/chat_tokenize` too) needs the bearer token
when it is set."""

OFFLOAD_TOKENS = 2_000
"""A tokenize reply of at least this many tokens is built in a native thread: the per-token work and the JSON
then share the GIL with the hub instead of holding it throughout."""


def _health() -> Response:
    if current_state().is_healthy():
        return Response(b"", status=200)
    return json_response(UNHEALTHY_BODY, status=503)


@blueprint.get("/ping")
def ping() -> Response:
    return _health()


@blueprint.get("/health")
def health() -> Response:
    return _health()


@blueprint.get("/")
def health_root() -> Response:
    return _health()


@blueprint.get("/info")
def info() -> Response:
    state = current_state()
    engine = state.engine
    if engine is None or engine.info is None:
        return json_response(UNHEALTHY_BODY, status=503)
    limits = state.limits()
    settings = state.settings
    return json_response(
        {
            "model_id": state.model_name(),
            "model_sha": None,
            "model_pipeline_tag": "text-generation",
            "max_concurrent_requests": settings.max_concurrent_requests,
            "max_best_of": settings.max_best_of,
            "max_stop_sequences": settings.max_stop_sequences,
            "max_input_tokens": limits.max_input_tokens,
            "max_total_tokens": limits.max_total_tokens,
            "validation_workers": settings.num_workers,
            "max_client_batch_size": settings.max_client_batch_size,
            "router": "text-generation-router",
            "version": SERVER_VERSION,
            "sha": None,
            "docker_label": None,
            # Beyond TGI's fields: what the engine sized and chose at start-up.
            "engine": _engine_section(engine.info),
        }
    )


def _engine_section(info) -> dict:
    return {
        "architecture": info.architecture,
        "device": info.device,
        "dtype": info.dtype,
        "attention_backend": info.attention_backend,
        "cuda_graphs": info.cuda_graphs,
        "prefix_caching": info.prefix_caching,
        "tensor_parallel_size": info.tensor_parallel_size,
        "max_model_len": info.max_model_len,
        "max_total_tokens_limited_by": info.context_limited_by,
        "model_max_position_embeddings": info.max_position_embeddings,
        "max_batch_size": info.max_num_seqs,
        "max_batch_prefill_tokens": info.max_num_prefill_tokens,
        "kv_cache_block_size": info.block_size,
        "kv_cache_blocks": info.num_kv_blocks,
        "kv_cache_tokens": info.num_kv_blocks * info.block_size,
        "kv_cache_bytes": info.kv_cache_bytes,
    }


@blueprint.get("/v1/models")
def models() -> Response:
    set_dialect(Dialect.OPENAI)
    state = current_state()
    engine = state.engine
    if engine is None or engine.info is None:
        raise ApiError(ErrorKind.NOT_READY, "the model is not ready yet")
    name = state.model_name()
    return json_response({"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": name}]})


@blueprint.get("/metrics")
def metrics() -> Response:
    state = current_state()
    engine = state.engine
    heartbeat = engine.last_heartbeat if engine is not None else None
    return Response(state.metrics.render(heartbeat), content_type=METRICS_CONTENT_TYPE)


@blueprint.post("/tokenize")
def tokenize() -> Response:
    """TGI's `/tokenize`: `[{"id", "text", "start", "stop"}]` for a generate body's `inputs` (after `truncate`),
    held to the prompt limits of `/generate`."""
    req = parse_body(GenerateRequest, read_json(), Dialect.TGI)
    req.check_truncate(current_state().limits().max_input_tokens)
    return _tokenized(req.inputs, req.add_special_tokens, req.parameters.truncate, lambda tokens: tokens)


@blueprint.post("/chat_tokenize")
def chat_tokenize() -> Response:
    """TGI's `/chat_tokenize`: the rendered chat prompt and its tokens, held to the prompt limits of a chat."""
    req = parse_body(ChatCompletionRequest, read_json(), Dialect.TGI)
    state = current_state()
    req.check(state.settings)
    refuse_non_text_parts(req.messages, state.model_name())
    text = plan_chat(req, state.tokenizer(), state.tool_support()).prompt
    return _tokenized(text, False, None, lambda tokens: {"tokenize_response": tokens, "templated_text": text})


def _tokenized(
    text: str, add_special_tokens: bool, truncate: int | None, reply: Callable[[list[dict]], object]
) -> Response:
    """The tokens of `text` as the route's JSON reply. A prompt longer than MAX_INPUT_TOKENS (after `truncate`)
    is refused as generation refuses it, before any per-token work, so the reply holds at most that many tokens.
    A long text is encoded, and a long reply built, in gevent's native thread pool (the hub keeps serving the
    worker's streams meanwhile)."""
    state = current_state()
    tokenizer, limits = state.tokenizer(), state.limits()
    encoding = tokenizer.encoding(text, add_special_tokens)
    first = max(0, len(encoding) - truncate) if truncate else 0
    resolve_max_new_tokens(len(encoding) - first, None, limits, Dialect.TGI)

    def body() -> bytes:
        spans = token_spans(text, encoding, first)
        return dumps(
            reply([{"id": i, "text": t, "start": start, "stop": stop} for i, t, start, stop in spans])
        ).encode()

    data = body() if len(encoding) - first < OFFLOAD_TOKENS else gevent.get_hub().threadpool.apply(body)
    return Response(data, content_type="application/json")
