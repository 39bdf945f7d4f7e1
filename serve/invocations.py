"""SageMaker's `/invocations`: which handler a body goes to, by MESSAGES_API_ENABLED or by the body's shape.

`true` takes OpenAI chat bodies only, `false` TGI bodies only; unset decides per body (`messages` → chat,
`prompt` → completions, `inputs` → TGI generate), as TGI ≥ 2.4 does. A body of an excluded shape gets a 422
that names the variable.
"""

from __future__ import annotations

from flask import Response

from serve.context import current_state, set_dialect
from serve.errors import ApiError, Dialect, ErrorKind
from serve.routes_openai import handle_chat, handle_completions
from serve.routes_tgi import GenerateMode, handle_generate

_SHAPES = ("inputs", "messages", "prompt")


def body_shape(body: object) -> str | None:
    """`inputs`, `messages` or `prompt`: the key that says which API a body speaks (None: no known shape)."""
    if not isinstance(body, dict):
        return None
    return next((key for key in _SHAPES if key in body), None)


def dispatch(body: object) -> Response:
    shape = body_shape(body)
    set_dialect(Dialect.TGI if shape in (None, "inputs") else Dialect.OPENAI)
    enabled = current_state().settings.messages_api_enabled
    if enabled is True and shape != "messages":
        raise ApiError(
            ErrorKind.WRONG_SHAPE,
            'This endpoint takes OpenAI chat bodies ({"messages": [...]}) because MESSAGES_API_ENABLED=true. '
            "Send messages, or set MESSAGES_API_ENABLED=false (or leave it unset) to send TGI bodies "
            '({"inputs": "...", "parameters": {...}}).',
            "messages",
        )
    if enabled is False and shape != "inputs":
        raise ApiError(
            ErrorKind.WRONG_SHAPE,
            'This endpoint takes TGI bodies ({"inputs": "...", "parameters": {...}}) because '
            "MESSAGES_API_ENABLED=false. Send inputs, or set MESSAGES_API_ENABLED=true (or leave it unset) "
            'to send OpenAI chat bodies ({"messages": [...]}).',
            "inputs",
        )
    if shape == "messages":
        return handle_chat(body)
    if shape == "prompt":
        return handle_completions(body)
    if shape == "inputs":
        return handle_generate(body, GenerateMode.COMPAT)
    raise ApiError(
        ErrorKind.WRONG_SHAPE,
        'The body matches no supported shape: send {"inputs": ...} (TGI), {"messages": [...]} (OpenAI chat) '
        'or {"prompt": ...} (OpenAI completions). MESSAGES_API_ENABLED=true or false restricts /invocations '
        "to one of them.",
    )
