"""OpenAI request bodies (chat completions, legacy completions) as pydantic models, with their checks.

Types are checked by pydantic (unknown fields ignored, and logged); ranges by `check()` with OpenAI's wording and 4xx
codes; what needs the served model (its names, vocabulary) by `check_model()`; `to_sampling_params()` turns a
checked body into the engine's record, with the model's own sampling defaults where the body leaves them unset.
How each field is used or refused is declared in `field_uses.py`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, StrictBool, StrictFloat, StrictInt, StrictStr

from model_handler.constraints import Constraint
from model_handler.sampling_params import SamplingParams
from serve.chat_prompt import template_message
from serve.errors import ApiError, ErrorKind, unsupported, validation
from serve.request_checks import check_token_ids, logit_bias_ids, refuse_audio_output, refuse_non_text_parts
from serve.schemas import check_openai_range, normalize_stop
from serve.schemas_tools import (
    FunctionDefinition,
    FunctionName,
    FunctionTool,
    JsonSchemaFormat,
    MessageToolCall,
    ResponseFormat,
    ToolChoice,
)
from serve.served_model import ServedModel
from serve.settings import Settings
from serve.tool_choice import check_tools
from serve.tool_formats import ToolSupport

_SEED_MODULUS = 1 << 63
MAX_TOP_LOGPROBS = 20
"""OpenAI's limit on `top_logprobs` (chat) and vLLM's on `logprobs` (completions; OpenAI's legacy API stops at 5)."""
OPENAI_RANGES: dict[str, tuple[float | None, float | None]] = {
    "temperature": (0, 2),
    "top_p": (0, 1),
    "n": (1, 128),
    "seed": (-(1 << 63), (1 << 63) - 1),  # OpenAI's: a signed 64-bit integer
    "frequency_penalty": (-2, 2),
    "presence_penalty": (-2, 2),
    "top_k": (0, None),
    "min_p": (0, 1),
    "top_logprobs": (0, MAX_TOP_LOGPROBS),
    "logprobs": (0, MAX_TOP_LOGPROBS),  # completions' (chat's is a boolean)
}
"""(minimum, maximum) of the numeric fields, checked with OpenAI's wording and published in /openapi.json."""


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


class AudioPart(_Body):
    type: Literal["input_audio"]
    input_audio: dict[str, Any]


class FilePart(_Body):
    type: Literal["file"]
    file: dict[str, Any]


ContentPart = Annotated[TextPart | ImagePart | AudioPart | FilePart, Field(discriminator="type")]
"""Parts other than text are parsed so that `check_model()` can refuse them by name: the models are text-only."""


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
    model_config = ConfigDict(extra="forbid")

    include_usage: StrictBool = False
    continuous_usage_stats: StrictBool = False
    """vLLM: the usage so far in every chunk."""


class _SamplingFields(_Body):
    """Fields chat and completions share, with the engine's extensions (top_k, min_tokens, ...). A field the body
    does not know is refused, naming it, as OpenAI does: a misspelt `max_token` must not quietly give a different
    answer. (Messages and their parts keep unknown keys out silently: clients send earlier replies back whole.)"""

    model_config = ConfigDict(extra="forbid")

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
    logit_bias: dict[StrictStr, StrictFloat] | None = None
    user: StrictStr | None = None
    top_k: StrictInt | None = None
    min_p: StrictFloat | None = None
    min_tokens: StrictInt | None = None
    repetition_penalty: StrictFloat | None = None
    ignore_eos: StrictBool | None = None
    stop_token_ids: list[StrictInt] | None = None
    _logit_bias: dict[int, float] = PrivateAttr(default_factory=dict)

    @property
    def num_choices(self) -> int:
        return self.n if self.n is not None else 1

    @property
    def stop_list(self) -> list[str]:
        return normalize_stop(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.continuous_usage_stats)

    @property
    def client_tags(self) -> dict[str, Any]:
        """What the client says about itself, for the request's log line (OpenAI's end-user ids)."""
        return {"user": self.user} if self.user is not None else {}

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def _check_common(self, settings: Settings, min_max_tokens: int = 1) -> None:
        max_tokens = self.requested_max_tokens()
        name = "max_completion_tokens" if getattr(self, "max_completion_tokens", None) is not None else "max_tokens"
        check_openai_range(name, max_tokens, min_max_tokens, None)
        for field_name in (
            "temperature",
            "top_p",
            "n",
            "seed",
            "frequency_penalty",
            "presence_penalty",
            "top_k",
            "min_p",
        ):
            check_openai_range(field_name, getattr(self, field_name), *OPENAI_RANGES[field_name])
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

    def check_model(self, served: ServedModel) -> None:
        """The checks that need the served model: its name, token ids against its vocabulary."""
        served.check_model(self.model)
        self._logit_bias = logit_bias_ids(self.logit_bias, served.vocab_size)
        check_token_ids("stop_token_ids", self.stop_token_ids, served.vocab_size)

    def _sampling(
        self, max_tokens: int, logprobs: int | None, choice: int, served: ServedModel, prompt_logprobs: int | None
    ) -> SamplingParams:
        seed = None if self.seed is None else (self.seed + choice) % _SEED_MODULUS
        defaults = served.sampling_defaults  # the model's generation_config.json, for what the body leaves unset
        top_p = self.top_p if self.top_p is not None else defaults.get("top_p", 1.0)
        top_k = self.top_k if self.top_k is not None else int(defaults.get("top_k", 0))
        return SamplingParams(
            max_tokens=max_tokens,
            min_tokens=self.min_tokens or 0,
            temperature=self.temperature if self.temperature is not None else defaults.get("temperature", 1.0),
            # top_p=0 (OpenAI allows it) keeps only the most likely token: top-k 1 says so to the engine.
            top_p=top_p or 1.0,
            top_k=1 if top_p == 0 else top_k,
            min_p=self.min_p if self.min_p is not None else defaults.get("min_p", 0.0),
            seed=seed,
            repetition_penalty=(
                self.repetition_penalty
                if self.repetition_penalty is not None
                else defaults.get("repetition_penalty", 1.0)
            ),
            frequency_penalty=self.frequency_penalty or 0.0,
            presence_penalty=self.presence_penalty or 0.0,
            ignore_eos=bool(self.ignore_eos),
            stop_token_ids=tuple(self.stop_token_ids or ()),
            logit_bias=dict(self._logit_bias),
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
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
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = None
    """OpenAI's reasoning effort: a variable of the chat template (as vLLM passes it), for templates that read it."""
    # OpenAI's other fields: a text-only model with nothing stored or moderated can honour these only as below.
    modalities: list[Literal["text", "audio"]] | None = None
    audio: dict[str, Any] | None = None
    metadata: dict[StrictStr, StrictStr] | None = None
    safety_identifier: StrictStr | None = None
    prompt_cache_key: StrictStr | None = None
    service_tier: StrictStr | None = None
    store: StrictBool | None = None
    moderation: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    prompt_cache_options: dict[str, Any] | None = None
    prompt_cache_retention: StrictStr | None = None
    verbosity: StrictStr | None = None
    web_search_options: dict[str, Any] | None = None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def client_tags(self) -> dict[str, Any]:
        tags = {"user": self.user, "safety_identifier": self.safety_identifier}
        tags.update(prompt_cache_key=self.prompt_cache_key, metadata=self.metadata)
        spec = self.response_format.spec if isinstance(self.response_format, JsonSchemaFormat) else None
        tags["response_format"] = spec.name if spec is not None else None
        return {name: value for name, value in tags.items() if value is not None}

    def check(self, settings: Settings) -> None:
        self._check_common(settings)
        for index, message in enumerate(self.messages):
            if message.content is None and message.role not in _CONTENT_OPTIONAL:
                where = f"messages.{index}.content"  # OpenAI requires it, TGI fails to deserialize without it
                raise ApiError(ErrorKind.DESERIALIZE, f"Missing required parameter: '{where}'.", where)
        check_openai_range("top_logprobs", self.top_logprobs, *OPENAI_RANGES["top_logprobs"])
        self._check_openai_extras()
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

    def _check_openai_extras(self) -> None:
        refuse_audio_output(self.modalities, self.audio)
        for name, what in _NOT_OFFERED.items():
            if getattr(self, name) is not None:
                raise unsupported(f"Invalid '{name}': {what} is not supported by this server.", name)
        if self.store:
            raise unsupported(
                "Invalid 'store': this server stores no completions; send false or leave it out.", "store"
            )
        if self.service_tier not in (None, "auto", "default"):
            raise unsupported(
                f"Invalid 'service_tier': this server has one tier; {self.service_tier!r} is not available "
                "(send 'auto' or 'default').",
                "service_tier",
            )
        if self.metadata is not None and (
            len(self.metadata) > 16 or any(len(k) > 64 or len(v) > 512 for k, v in self.metadata.items())
        ):
            raise validation(
                "Invalid 'metadata': at most 16 pairs, keys up to 64 and values up to 512 characters.", "metadata"
            )

    def check_model(self, served: ServedModel) -> None:
        super().check_model(served)
        refuse_non_text_parts(self.messages, served.name)

    def template_messages(self, support: ToolSupport) -> list[dict[str, Any]]:
        return [m.template_dict(i, support) for i, m in enumerate(self.messages)]

    def to_sampling_params(
        self, max_tokens: int, served: ServedModel, choice: int = 0, constraint: Constraint | None = None
    ) -> SamplingParams:
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        params = self._sampling(max_tokens, logprobs, choice, served, None)
        params.constraint = constraint
        return params


_NOT_OFFERED = {
    "moderation": "moderation",
    "prediction": "predicted output",
    "prompt_cache_options": "configuring the prompt cache (prefixes are cached automatically)",
    "prompt_cache_retention": "a prompt-cache retention policy (prefixes are cached automatically)",
    "verbosity": "verbosity",
    "web_search_options": "web search",
}
"""Chat fields refused whenever present: what OpenAI's service does with them does not exist here."""


PromptType = StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]


class CompletionRequest(_SamplingFields):
    prompt: PromptType
    logprobs: StrictInt | None = None
    echo: StrictBool | None = False
    suffix: StrictStr | None = None
    best_of: StrictInt | None = None

    @property
    def echo_only(self) -> bool:
        """`echo` with `max_tokens: 0`: the prompt (and its logprobs) alone, as OpenAI's legacy API and vLLM."""
        return bool(self.echo) and self.max_tokens == 0

    def check(self, settings: Settings) -> None:
        if self.max_tokens == 0 and not self.echo:
            raise validation("Invalid 'max_tokens': 0 generates nothing; it needs 'echo': true.", "max_tokens")
        self._check_common(settings, min_max_tokens=0)
        check_openai_range("logprobs", self.logprobs, *OPENAI_RANGES["logprobs"])
        if self.suffix is not None:
            raise unsupported("suffix is not supported", "suffix")
        if self.best_of is not None and self.best_of != self.num_choices:
            raise unsupported("best_of other than n is not supported", "best_of")
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

    def to_sampling_params(self, max_tokens: int, served: ServedModel, choice: int = 0) -> SamplingParams:
        prompt_logprobs = self.logprobs if self.echo else None  # echoed prompt tokens carry logprobs too
        return self._sampling(max_tokens, self.logprobs, choice, served, prompt_logprobs)
