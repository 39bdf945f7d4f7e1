"""The reply bodies of both dialects as pydantic models, for /openapi.json only: `responses.py` builds the replies
as plain dicts (fast), and tests/serve/test_openapi.py validates real replies against these schemas.

A field with a default may be absent from a reply (OpenAI's `usage` in chunks, TGI's `details`, `top_tokens`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

# ---- OpenAI -----------------------------------------------------------------------------------------


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(description="Prompt tokens whose KV came from the prefix cache.")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobEntry(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprobEntry] | None
    refusal: list[TokenLogprobEntry] | None = None


class CalledFunction(BaseModel):
    name: str
    arguments: str = Field(description="The arguments as a JSON string (valid for the tool's schema).")


class ToolCall(BaseModel):
    id: str = Field(description="`call_` and 24 characters; 9 letters and digits for Mistral's format.")
    type: Literal["function"]
    function: CalledFunction


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None = Field(description="The answer; null when the reply is tool calls only.")
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = None
    reasoning_content: str | None = Field(
        None, description="The reasoning block's text, for chat templates with one (`<think>`); absent otherwise."
    )


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None
    finish_reason: Literal["stop", "length", "tool_calls", "content_filter"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChoice]
    usage: Usage


class CalledFunctionDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(BaseModel):
    """A call's first delta has `id`, `type`, the name and `arguments: ""`; later ones argument fragments only."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: CalledFunctionDelta | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None
    reasoning_content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls", "content_filter"] | None


class ChatCompletionChunk(BaseModel):
    """One `data:` event of a chat stream (the stream ends with `data: [DONE]`)."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChunkChoice]
    usage: Usage | None = Field(None, description="null, or the usage so far with continuous_usage_stats")


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None] = Field(description="null for an echoed prompt's first token")
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: Literal["stop", "length"] | None = Field(description="null in a stream's chunks before the last")


class Completion(BaseModel):
    """A legacy completion, or one `data:` event of its stream (then `usage` is absent, null or the usage so far)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class OpenAIErrorBody(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIError(BaseModel):
    error: OpenAIErrorBody


# ---- TGI --------------------------------------------------------------------------------------------

TgiFinishReason = Literal["length", "eos_token", "stop_sequence"]


class TgiToken(BaseModel):
    id: int
    text: str
    logprob: float | None
    special: bool


class PrefillToken(BaseModel):
    id: int
    text: str
    logprob: float | None = Field(description="null for the first prompt token")


class BestOfSequence(BaseModel):
    generated_text: str
    finish_reason: TgiFinishReason
    generated_tokens: int
    seed: int | None
    prefill: list[PrefillToken]
    tokens: list[TgiToken]
    top_tokens: list[list[TgiToken]] | None = None


class Details(BaseModel):
    finish_reason: TgiFinishReason
    generated_tokens: int
    seed: int | None
    prefill: list[PrefillToken] = Field(description="the prompt's tokens with decoder_input_details, else empty")
    tokens: list[TgiToken]
    top_tokens: list[list[TgiToken]] | None = None
    best_of_sequences: list[BestOfSequence] | None = None


class GenerateResponse(BaseModel):
    generated_text: str
    details: Details | None = None


class StreamDetails(BaseModel):
    finish_reason: TgiFinishReason
    generated_tokens: int
    seed: int | None
    input_length: int


class StreamResponse(BaseModel):
    """One `data:` event of a TGI stream (no `[DONE]` at the end)."""

    index: int
    token: TgiToken
    top_tokens: list[TgiToken] | None = None
    generated_text: str | None
    details: StreamDetails | None


class TgiError(BaseModel):
    error: str
    error_type: str


class SimpleToken(BaseModel):
    id: int
    text: str
    start: int
    stop: int


class ChatTokenizeResponse(BaseModel):
    tokenize_response: list[SimpleToken]
    templated_text: str


class Info(BaseModel):
    model_id: str
    model_sha: str | None
    model_pipeline_tag: str | None
    max_concurrent_requests: int
    max_best_of: int
    max_stop_sequences: int
    max_input_tokens: int
    max_total_tokens: int
    validation_workers: int
    max_client_batch_size: int
    router: str
    version: str
    sha: str | None
    docker_label: str | None
    engine: dict[str, Any] = Field(description="what the engine sized and chose at start-up")


class ModelError(BaseModel):
    """What the SageMaker runtime answers (424) when the container answers an error."""

    ErrorCode: str
    LogStreamArn: str
    Message: str
    OriginalMessage: str
    OriginalStatusCode: int
