"""OpenAI request bodies (chat completions, legacy completions) as pydantic models, with their checks.

Types are checked by pydantic (unknown fields ignored); ranges by `check()` with OpenAI's wording and 4xx codes;
`to_sampling_params()` turns a checked body into the engine's record.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from model_handler.constraints import Constraint
from model_handler.sampling_params import SamplingParams
from serve.chat_prompt import template_message
from serve.errors import ApiError, ErrorKind, unsupported, validation
from serve.schemas import check_openai_range, normalize_stop
from serve.schemas_tools import (
    FunctionDefinition,
    FunctionName,
    FunctionTool,
    MessageToolCall,
    ResponseFormat,
    ToolChoice,
)
from serve.settings import Settings
from serve.tool_choice import check_tools
from serve.tool_formats import ToolSupport

_SEED_MODULUS = 1 << 63


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Body):
    type: Literal["text"]
    text: StrictStr


class ImageUrl(_Body):
    url: StrictStr


class ImagePart(_Body):
    type: Literal["image_url"]
    image_url: ImageUrl


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


_CONTENT_OPTIONAL = frozenset({"assistant", "function"})
"""Roles whose messages may come without content (an assistant turn of tool calls); the others need it."""


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: StrictStr | list[ContentPart] | None = None
    name: StrictStr | None = None
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: StrictStr | None = None
    reasoning_content: StrictStr | None = None
    """An assistant turn's reasoning (vLLM's field); templates that show earlier reasoning (Qwen3) read it."""

    def text(self) -> str:
        """Flat text content (TGI's flattening of content parts); "" for an assistant turn of tool calls only."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text if isinstance(p, TextPart) else f"![]({p.image_url.url})" for p in self.content)

    def template_dict(self, index: int, support: ToolSupport) -> dict[str, Any]:
        """What the chat template sees: role, text, and the tool calls, call id, name and reasoning given."""
        role = "system" if self.role == "developer" else self.role
        return template_message(
            role,
            self.text(),
            support,
            f"messages.{index}",
            name=self.name,
            tool_calls=self.tool_calls,
            tool_call_id=self.tool_call_id,
            reasoning_content=self.reasoning_content,
        )


class StreamOptions(_Body):
    include_usage: StrictBool = False


class _SamplingFields(_Body):
    """Fields chat and completions share, with the engine's extensions (top_k, min_tokens, ...)."""

    model: StrictStr | None = None
    max_tokens: StrictInt | None = None
    temperature: StrictFloat | None = None
    top_p: StrictFloat | None = None
    n: StrictInt | None = None
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = None
    frequency_penalty: StrictFloat | None = None
    presence_penalty: StrictFloat | None = None
    logit_bias: dict[str, Any] | None = None
    user: StrictStr | None = None
    top_k: StrictInt | None = None
    min_tokens: StrictInt | None = None
    repetition_penalty: StrictFloat | None = None
    ignore_eos: StrictBool | None = None

    @property
    def num_choices(self) -> int:
        return self.n if self.n is not None else 1

    @property
    def stop_list(self) -> list[str]:
        return normalize_stop(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def _check_common(self, settings: Settings) -> None:
        max_tokens = self.requested_max_tokens()
        name = "max_completion_tokens" if getattr(self, "max_completion_tokens", None) is not None else "max_tokens"
        check_openai_range(name, max_tokens, 1, None)
        check_openai_range("temperature", self.temperature, 0, 2)
        check_openai_range("top_p", self.top_p, 0, 1)
        check_openai_range("n", self.n, 1, 128)
        check_openai_range("frequency_penalty", self.frequency_penalty, -2, 2)
        check_openai_range("presence_penalty", self.presence_penalty, -2, 2)
        check_openai_range("top_k", self.top_k, 0, None)
        check_openai_range("min_tokens", self.min_tokens, 0, max_tokens)
        if self.repetition_penalty is not None and self.repetition_penalty <= 0:
            raise validation("Invalid 'repetition_penalty': must be > 0.", "repetition_penalty")
        stops = self.stop_list
        if len(stops) > settings.max_stop_sequences:
            raise validation(
                f"Invalid 'stop': array too long. Expected an array with maximum length "
                f"{settings.max_stop_sequences}, but got an array with length {len(stops)} instead.",
                "stop",
            )
        if self.stream_options is not None and not self.stream:
            message = "The 'stream_options' parameter is only allowed when 'stream' is enabled."
            raise validation(message, "stream_options")

    def _sampling(self, max_tokens: int, logprobs: int | None, choice: int) -> SamplingParams:
        seed = None if self.seed is None else (self.seed + choice) % _SEED_MODULUS
        return SamplingParams(
            max_tokens=max_tokens,
            min_tokens=self.min_tokens or 0,
            temperature=1.0 if self.temperature is None else self.temperature,
            # top_p=0 (OpenAI allows it) keeps only the most likely token: top-k 1 says so to the engine.
            top_p=1.0 if not self.top_p else self.top_p,
            top_k=1 if self.top_p == 0 else self.top_k or 0,
            seed=seed,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            frequency_penalty=self.frequency_penalty or 0.0,
            presence_penalty=self.presence_penalty or 0.0,
            ignore_eos=bool(self.ignore_eos),
            logprobs=logprobs,
        )


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = None
    response_format: ResponseFormat | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: StrictBool | None = None
    tool_prompt: StrictStr | None = None
    """TGI: text that tells the model how to call the tools, added to the system (else first user) message."""
    chat_template_kwargs: dict[str, Any] | None = None
    """vLLM: extra variables for the chat template, e.g. `{"enable_thinking": false}`."""
    thinking_token_budget: StrictInt | None = None
    """vLLM: most tokens a reasoning block may take; the block is then closed and the answer follows."""
    functions: list[FunctionDefinition] | None = None
    """OpenAI's deprecated form of `tools`: refused, naming its replacement."""
    function_call: Literal["none", "auto"] | FunctionName | None = None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def check(self, settings: Settings) -> None:
        self._check_common(settings)
        for index, message in enumerate(self.messages):
            if message.content is None and message.role not in _CONTENT_OPTIONAL:
                where = f"messages.{index}.content"  # OpenAI requires it, TGI fails to deserialize without it
                raise ApiError(ErrorKind.DESERIALIZE, f"Missing required parameter: '{where}'.", where)
        check_openai_range("top_logprobs", self.top_logprobs, 0, settings.max_top_n_tokens)
        if self.top_logprobs and not self.logprobs:
            raise validation("Invalid 'top_logprobs': 'logprobs' must be set to true to use it.", "top_logprobs")
        for legacy in ("functions", "function_call"):
            if getattr(self, legacy) is not None:
                raise unsupported(f"'{legacy}' is deprecated and not supported: use 'tools' and 'tool_choice'", legacy)
        check_tools(self.tools, self.tool_choice)
        if self.tool_prompt is not None and (not self.tools or self.tool_choice == "none"):
            raise validation(
                "Invalid 'tool_prompt': it needs 'tools' and a 'tool_choice' other than none.", "tool_prompt"
            )
        check_openai_range("thinking_token_budget", self.thinking_token_budget, 0, None)

    def template_messages(self, support: ToolSupport) -> list[dict[str, Any]]:
        return [m.template_dict(i, support) for i, m in enumerate(self.messages)]

    def to_sampling_params(
        self, max_tokens: int, choice: int = 0, constraint: Constraint | None = None
    ) -> SamplingParams:
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        params = self._sampling(max_tokens, logprobs, choice)
        params.constraint = constraint
        return params


PromptType = StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]


class CompletionRequest(_SamplingFields):
    prompt: PromptType
    logprobs: StrictInt | None = None
    echo: StrictBool | None = False
    suffix: StrictStr | None = None
    best_of: StrictInt | None = None

    def check(self, settings: Settings) -> None:
        self._check_common(settings)
        check_openai_range("logprobs", self.logprobs, 0, settings.max_top_n_tokens)
        if self.suffix is not None:
            raise unsupported("suffix is not supported", "suffix")
        if self.best_of is not None and self.best_of != self.num_choices:
            raise unsupported("best_of other than n is not supported", "best_of")
        if self.echo and self.logprobs is not None:
            raise unsupported("echo with logprobs needs prompt logprobs, which are not supported", "echo")
        prompts = self.prompts()
        if not prompts or any(len(p) == 0 for p in prompts):
            raise validation("Invalid 'prompt': the prompt must not be empty.", "prompt")
        if len(prompts) > settings.max_client_batch_size:
            raise validation(
                f"Number of prompts exceeds the maximum allowed batch size of {settings.max_client_batch_size}",
                "prompt",
            )

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: text, or token ids given directly."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if prompt and all(isinstance(p, int) for p in prompt):
            return [list(prompt)]  # type: ignore[arg-type]
        return list(prompt)  # type: ignore[arg-type]

    def to_sampling_params(self, max_tokens: int, choice: int = 0) -> SamplingParams:
        return self._sampling(max_tokens, self.logprobs, choice)
