"""Request bodies: parsing into the pydantic models of each dialect and the checks they share.

The models live in `schemas_openai.py` (chat, completions) and `schemas_tgi.py` (generate); this module turns
pydantic's complaints into each dialect's messages and checks prompt lengths against the token limits.
"""

from __future__ import annotations

from typing import TypeVar

from pydantic import BaseModel, ValidationError

from serve.errors import ApiError, Dialect, ErrorKind
from serve.settings import TokenLimits

M = TypeVar("M", bound=BaseModel)


def parse_body(model: type[M], body: object, dialect: Dialect) -> M:
    """Validate a decoded JSON body; wrong, missing or unknown fields become a 4xx in the route's dialect."""
    if not isinstance(body, dict):
        raise ApiError(ErrorKind.DESERIALIZE, f"expected a JSON object, got {type(body).__name__}")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise _from_pydantic(exc, dialect) from None


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "none", "list", "dict", "json-or-python"})


def _clean_loc(loc: tuple) -> str:
    """A field path without pydantic's union-branch labels (`str`, `list[...]`, `TextPart`)."""
    parts = [
        str(part)
        for part in loc
        if isinstance(part, int) or (part not in _TYPE_TAGS and "[" not in str(part) and not str(part)[:1].isupper())
    ]
    return ".".join(parts)


def _from_pydantic(exc: ValidationError, dialect: Dialect) -> ApiError:
    # Of a union's per-branch complaints, the deepest one is about the branch the client meant.
    error = max(exc.errors(include_url=False), key=lambda e: len(e["loc"]))
    loc = _clean_loc(error["loc"])
    if dialect is Dialect.TGI:
        if error["type"] == "missing":
            return ApiError(ErrorKind.DESERIALIZE, f"missing field `{loc}`", loc)
        if error["type"] == "extra_forbidden":
            return ApiError(ErrorKind.DESERIALIZE, f"unknown field `{loc}`", loc)
        return ApiError(ErrorKind.DESERIALIZE, f"{loc}: {error['msg']}", loc)
    if error["type"] == "missing":
        return ApiError(ErrorKind.DESERIALIZE, f"Missing required parameter: '{loc}'.", loc)
    if error["type"] == "extra_forbidden":  # OpenAI's own wording
        return ApiError(ErrorKind.DESERIALIZE, f"Unrecognized request argument supplied: {loc}", loc)
    return ApiError(ErrorKind.DESERIALIZE, f"Invalid value for '{loc}': {error['msg']}.", loc)


def openai_range_error(name: str, value: float, minimum: float | None, maximum: float | None) -> ApiError | None:
    """OpenAI's wording for a number out of range, or None when it is in range."""
    kind = "integer" if isinstance(value, int) else "decimal"
    if minimum is not None and value < minimum:
        return ApiError(
            ErrorKind.VALIDATION,
            f"Invalid '{name}': {kind} below minimum value. Expected a value >= {_num(minimum)}, "
            f"but got {_num(value)} instead.",
            name,
        )
    if maximum is not None and value > maximum:
        return ApiError(
            ErrorKind.VALIDATION,
            f"Invalid '{name}': {kind} above maximum value. Expected a value <= {_num(maximum)}, "
            f"but got {_num(value)} instead.",
            name,
        )
    return None


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def check_openai_range(name: str, value: float | None, minimum: float | None, maximum: float | None) -> None:
    if value is not None:
        error = openai_range_error(name, value, minimum, maximum)
        if error is not None:
            raise error


def resolve_max_new_tokens(
    num_prompt_tokens: int, requested: int | None, limits: TokenLimits, dialect: Dialect, what: str = "messages"
) -> int:
    """Check the prompt and prompt + max new tokens against the limits; an omitted max fills the context."""
    total_limit, input_limit = limits.max_total_tokens, limits.max_input_tokens
    too_long = num_prompt_tokens > input_limit
    if requested is not None and num_prompt_tokens + requested > total_limit:
        if dialect is Dialect.TGI:
            raise ApiError(
                ErrorKind.CONTEXT_LENGTH,
                f"`inputs` tokens + `max_new_tokens` must be <= {total_limit}. Given: {num_prompt_tokens} "
                f"`inputs` tokens and {requested} `max_new_tokens`",
                "max_new_tokens",
            )
        raise ApiError(
            ErrorKind.CONTEXT_LENGTH,
            f"This model's maximum context length is {total_limit} tokens. However, you requested "
            f"{num_prompt_tokens + requested} tokens ({num_prompt_tokens} in the {what}, {requested} in the "
            f"completion). Please reduce the length of the {what} or completion.",
            what,
        )
    if too_long:
        if dialect is Dialect.TGI:
            raise ApiError(
                ErrorKind.CONTEXT_LENGTH,
                f"`inputs` must have less than {input_limit} tokens. Given: {num_prompt_tokens}",
                "inputs",
            )
        raise ApiError(
            ErrorKind.CONTEXT_LENGTH,
            f"This model's maximum input length is {input_limit} tokens. However, your {what} resulted in "
            f"{num_prompt_tokens} tokens. Please reduce the length of the {what}.",
            what,
        )
    return requested if requested is not None else total_limit - num_prompt_tokens


def normalize_stop(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)
