"""The OpenAPI 3.1 document of every route (`GET /openapi.json`), assembled here from pydantic's JSON Schema of the
models that validate the requests (schemas_openai.py, schemas_tgi.py) and describe the replies (reply_models.py),
with this server's own limits (MAX_STOP_SEQUENCES, MAX_TOP_N_TOKENS, ...) written into the request schemas.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from serve import reply_models as replies
from serve.responses import SERVER_VERSION
from serve.schemas_openai import OPENAI_RANGES, ChatCompletionRequest, CompletionRequest
from serve.schemas_tgi import GenerateRequest
from serve.settings import Settings

_REF = "#/components/schemas/{model}"
_REQUESTS: list[type[BaseModel]] = [ChatCompletionRequest, CompletionRequest, GenerateRequest]
_REPLIES: list[type[BaseModel]] = [
    replies.ChatCompletion,
    replies.ChatCompletionChunk,
    replies.Completion,
    replies.ModelList,
    replies.OpenAIError,
    replies.GenerateResponse,
    replies.StreamResponse,
    replies.TgiError,
    replies.SimpleToken,
    replies.ChatTokenizeResponse,
    replies.Info,
    replies.ModelError,
]


def ref(name: str) -> dict:
    return {"$ref": _REF.format(model=name)}


def _json(schema: dict) -> dict:
    return {"application/json": {"schema": schema}}


def _sse(event: str, ends: str) -> dict:
    return {"text/event-stream": {"schema": {"type": "string", "description": f"`data: <{event} JSON>` events{ends}"}}}


def _reply(description: str, content: dict | None = None) -> dict:
    return {"description": description, **({"content": content} if content else {})}


def _errors(error_model: str, codes: tuple[int, ...]) -> dict:
    words = {
        400: "invalid request, or a body cut short (shorter than its Content-Length)",
        401: "API_KEY is set and the bearer token is missing or wrong",
        404: "no such route",
        408: "the body did not arrive within REQUEST_READ_TIMEOUT",
        413: "body larger than PAYLOAD_LIMIT",
        415: "Content-Type is not JSON",
        422: "invalid request (TGI) or chat template error",
        424: "the generation failed (TGI)",
        429: "MAX_CONCURRENT_REQUESTS reached",
        500: "internal error",
        503: "the model is not ready",
    }
    return {str(code): _reply(words[code], _json(ref(error_model))) for code in codes}


_OPENAI_ERRORS = (400, 401, 408, 413, 415, 422, 429, 500, 503)
_TGI_ERRORS = (400, 401, 408, 413, 415, 422, 424, 429, 500, 503)


def _operation(summary: str, tag: str, responses: dict, body: dict | None = None, params: list | None = None) -> dict:
    operation: dict[str, Any] = {"summary": summary, "tags": [tag], "responses": responses}
    if body is not None:
        operation["requestBody"] = {"required": True, "content": _json(body)}
    if params:
        operation["parameters"] = params
    return operation


def _paths() -> dict:
    chat, completion, generate = ref("ChatCompletionRequest"), ref("CompletionRequest"), ref("GenerateRequest")
    health = {"200": _reply("ready (empty body)"), "503": _reply("not ready", _json(ref("TgiError")))}
    chat_ok = _reply(
        "a chat completion, or with `stream` its chunks",
        {**_json(ref("ChatCompletion")), **_sse("ChatCompletionChunk", ", then `data: [DONE]`")},
    )
    completion_ok = _reply(
        "a completion, or with `stream` its chunks",
        {**_json(ref("Completion")), **_sse("Completion", ", then `data: [DONE]`")},
    )
    generate_ok = _reply("the generated text", _json(ref("GenerateResponse")))
    stream_ok = _reply("one event per token; the last carries generated_text", _sse("StreamResponse", ""))
    compat_ok = _reply(
        "a one-element list, or with `stream` TGI's stream",
        {**_json({"type": "array", "items": ref("GenerateResponse")}), **_sse("StreamResponse", "")},
    )
    any_body = {"oneOf": [chat, completion, generate]}
    invocation_ok = _reply(
        "what the body's route answers: chat completion, completion, or TGI's list; streams when `stream`",
        {
            **_json(
                {
                    "oneOf": [
                        ref("ChatCompletion"),
                        ref("Completion"),
                        {"type": "array", "items": ref("GenerateResponse")},
                    ]
                }
            ),
            **_sse("ChatCompletionChunk, Completion or StreamResponse", ""),
        },
    )
    invocation_errors = {
        code: _reply(reply["description"], _json({"oneOf": [ref("OpenAIError"), ref("TgiError")]}))
        for code, reply in _errors("TgiError", _TGI_ERRORS).items()
    }
    endpoint = [{"name": "endpoint_name", "in": "path", "required": True, "schema": {"type": "string"}}]
    model_error = {"424": _reply("the container answered an error (SageMaker's ModelError)", _json(ref("ModelError")))}
    return {
        "/ping": {"get": _operation("Health (SageMaker)", "health", health)},
        "/health": {"get": _operation("Health (TGI)", "health", health)},
        "/": {
            "get": _operation("Health", "health", health),
            "post": _operation(
                "TGI generate or stream, by `stream`",
                "tgi",
                {"200": compat_ok, **_errors("TgiError", _TGI_ERRORS)},
                generate,
            ),
        },
        "/invocations": {
            "post": _operation(
                "SageMaker: chat, completion or TGI body (MESSAGES_API_ENABLED or the body's shape decides)",
                "sagemaker",
                {"200": invocation_ok, **invocation_errors},
                any_body,
            )
        },
        "/endpoints/{endpoint_name}/invocations": {
            "post": _operation(
                "Local stand-in for SageMaker's InvokeEndpoint",
                "sagemaker",
                {"200": invocation_ok, **model_error},
                any_body,
                endpoint,
            )
        },
        "/endpoints/{endpoint_name}/invocations-response-stream": {
            "post": _operation(
                "Local stand-in for SageMaker's InvokeEndpointWithResponseStream",
                "sagemaker",
                {
                    "200": _reply(
                        "the SSE bytes in AWS event-stream PayloadPart frames",
                        {"application/vnd.amazon.eventstream": {"schema": {"type": "string", "format": "binary"}}},
                    ),
                    **model_error,
                },
                any_body,
                endpoint,
            )
        },
        "/v1/chat/completions": {
            "post": _operation(
                "OpenAI chat completions", "openai", {"200": chat_ok, **_errors("OpenAIError", _OPENAI_ERRORS)}, chat
            )
        },
        "/v1/completions": {
            "post": _operation(
                "OpenAI legacy completions",
                "openai",
                {"200": completion_ok, **_errors("OpenAIError", _OPENAI_ERRORS)},
                completion,
            )
        },
        "/v1/models": {
            "get": _operation(
                "The served model",
                "openai",
                {"200": _reply("one model", _json(ref("ModelList"))), **_errors("OpenAIError", (503,))},
            )
        },
        "/generate": {
            "post": _operation(
                "TGI generate", "tgi", {"200": generate_ok, **_errors("TgiError", _TGI_ERRORS)}, generate
            )
        },
        "/generate_stream": {
            "post": _operation(
                "TGI generate, streamed", "tgi", {"200": stream_ok, **_errors("TgiError", _TGI_ERRORS)}, generate
            )
        },
        "/tokenize": {
            "post": _operation(
                "TGI tokenize",
                "tgi",
                {
                    "200": _reply("tokens", _json({"type": "array", "items": ref("SimpleToken")})),
                    **_errors("TgiError", _TGI_ERRORS),
                },
                generate,
            )
        },
        "/chat_tokenize": {
            "post": _operation(
                "TGI chat tokenize: the rendered template and its tokens",
                "tgi",
                {
                    "200": _reply("template and tokens", _json(ref("ChatTokenizeResponse"))),
                    **_errors("TgiError", _TGI_ERRORS),
                },
                chat,
            )
        },
        "/info": {
            "get": _operation(
                "TGI info", "tgi", {"200": _reply("model and limits", _json(ref("Info"))), "503": health["503"]}
            )
        },
        "/metrics": {
            "get": _operation(
                "Prometheus metrics",
                "health",
                {"200": _reply("Prometheus text", {"text/plain": {"schema": {"type": "string"}}})},
            )
        },
        "/openapi.json": {
            "get": _operation("This document", "docs", {"200": _reply("OpenAPI 3.1", _json({"type": "object"}))})
        },
        "/docs": {
            "get": _operation(
                "Swagger UI of this document (served offline)",
                "docs",
                {"200": _reply("HTML", {"text/html": {"schema": {"type": "string"}}})},
            )
        },
        "/docs/{asset}": {
            "get": _operation(
                "Swagger UI's files",
                "docs",
                {"200": _reply("a packaged file"), "404": _reply("no such file", _json(ref("TgiError")))},
                params=[{"name": "asset", "in": "path", "required": True, "schema": {"type": "string"}}],
            )
        },
    }


def _set(schemas: dict, model: str, field: str, **constraints: object) -> None:
    schemas[model]["properties"][field].update({k: v for k, v in constraints.items() if v is not None})


def _constrain(schemas: dict, settings: Settings) -> None:
    """What check() enforces beyond the types, as JSON Schema keywords on the request schemas."""
    for model in ("ChatCompletionRequest", "CompletionRequest"):
        for field, (low, high) in OPENAI_RANGES.items():
            if field in schemas[model]["properties"] and (model == "CompletionRequest" or field != "logprobs"):
                _set(schemas, model, field, minimum=low, maximum=high)
        _set(schemas, model, "stop", maxItems=settings.max_stop_sequences)
    _set(schemas, "ChatCompletionRequest", "max_tokens", minimum=1)
    _set(schemas, "ChatCompletionRequest", "max_completion_tokens", minimum=1)
    _set(schemas, "CompletionRequest", "max_tokens", minimum=0, description="0 only with echo: the prompt alone")
    _set(schemas, "CompletionRequest", "prompt", minItems=1, minLength=1, maxItems=settings.max_client_batch_size)
    _set(schemas, "GenerateRequest", "inputs", minLength=1)
    positive = {"exclusiveMinimum": 0}
    for field in ("temperature", "repetition_penalty"):
        _set(schemas, "GenerateParameters", field, **positive)
    for field in ("top_p", "typical_p"):
        _set(schemas, "GenerateParameters", field, exclusiveMinimum=0, exclusiveMaximum=1)
    _set(schemas, "GenerateParameters", "frequency_penalty", minimum=-2, maximum=2)
    _set(schemas, "GenerateParameters", "top_k", minimum=1)
    _set(schemas, "GenerateParameters", "max_new_tokens", minimum=1)
    _set(schemas, "GenerateParameters", "truncate", minimum=1)
    _set(schemas, "GenerateParameters", "seed", minimum=0, maximum=(1 << 64) - 1)
    _set(schemas, "GenerateParameters", "top_n_tokens", minimum=0, maximum=settings.max_top_n_tokens)
    _set(schemas, "GenerateParameters", "best_of", minimum=1, maximum=settings.max_best_of)
    _set(schemas, "GenerateParameters", "stop", maxItems=settings.max_stop_sequences)
    for model, field, what in (
        ("GenerateParameters", "watermark", "only false: true is refused"),
        ("GenerateParameters", "adapter_id", "refused: no adapter is ever loaded"),
        ("ChatCompletionRequest", "model", "this model's name, its id, or 'tgi'; anything else is refused"),
        ("CompletionRequest", "model", "this model's name, its id, or 'tgi'; anything else is refused"),
    ):
        _set(schemas, model, field, description=what)


def build_openapi(settings: Settings) -> dict:
    """The whole document for a server with these settings."""
    inputs = [(model, "validation") for model in _REQUESTS]
    outputs = [(model, "serialization") for model in _REPLIES]
    _, definitions = models_json_schema(inputs + outputs, ref_template=_REF)
    schemas = definitions["$defs"]
    _constrain(schemas, settings)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "SageMaker LLM container",
            "version": SERVER_VERSION,
            "description": "TGI's routes and OpenAI's chat and completions APIs. Errors on /v1 are OpenAI's "
            "{error: {message, type, param, code}}, elsewhere TGI's {error, error_type}.",
        },
        "paths": _paths(),
        "components": {"schemas": schemas},
    }
