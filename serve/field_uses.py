"""How every field of every request model is used or refused: one declaration per field, in one table per model.

`tests/serve/test_field_contract.py` checks the table against the models' own fields (a new field without a
declaration fails) and each declaration through the real routes: its `example` (merged into the route's base body,
after `given`) must show the declared effect. So no field can be accepted and silently ignored again.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import BaseModel

from serve.schemas_openai import (
    AudioPart,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    FilePart,
    ImagePart,
    ImageUrl,
    StreamOptions,
    TextPart,
)
from serve.schemas_tgi import GenerateParameters, GenerateRequest


@dataclass(frozen=True, slots=True)
class Engine:
    """Reaches the engine: `what` is a SamplingParams attribute, `prompt` (the prompt's token ids) or `requests`
    (how many engine requests the body makes)."""

    what: str
    example: dict
    given: dict = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Template:
    """Reaches the messages the chat template renders."""

    example: dict
    given: dict = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Reply:
    """Changes the reply: its text, its fields or its shape."""

    example: dict
    given: dict = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Logged:
    """Goes to the request's log line (who the client says it is), and nowhere else."""

    example: dict
    given: dict = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Checked:
    """Validated against what this server has (a model name, a tag, a tier): `example` holds a value it refuses
    with a 4xx naming the field; the values it accepts change nothing, by their own meaning."""

    example: dict
    given: dict = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Refused:
    """Not supported: `example` (any value but the default) gets a 4xx naming the field."""

    example: dict
    given: dict = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Pending:
    """Accepted and not used yet because open issue `issue` makes it work; the test asserts it still changes
    nothing, so the change that makes it work must re-declare it."""

    issue: int
    example: dict
    given: dict = field(default_factory=dict)


FieldUse = Engine | Template | Reply | Logged | Checked | Refused | Pending

_USER_HI = {"role": "user", "content": "hi"}
_IMAGE = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,x"}}]}]}
_AUDIO = {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "AA"}}]}]}
_FILE = {"messages": [{"role": "user", "content": [{"type": "file", "file": {"file_id": "f"}}]}]}

_SAMPLING_FIELDS: dict[str, FieldUse] = {
    "model": Checked({"model": "my-lora-adapter"}),
    "max_tokens": Engine("max_tokens", {"max_tokens": 2}),
    "temperature": Engine("temperature", {"temperature": 0.5}),
    "top_p": Engine("top_p", {"top_p": 0.5}),
    "n": Engine("requests", {"n": 2}),
    "stream": Reply({"stream": True}),
    "stream_options": Reply({"stream_options": {"include_usage": True}}, given={"stream": True}),
    "stop": Reply({"stop": ["world"]}),
    "seed": Engine("seed", {"seed": 5}),
    "frequency_penalty": Engine("frequency_penalty", {"frequency_penalty": 0.5}),
    "presence_penalty": Engine("presence_penalty", {"presence_penalty": 0.5}),
    "logit_bias": Engine("logit_bias", {"logit_bias": {"5": 10}}),
    "user": Logged({"user": "end-user-1"}),
    "top_k": Engine("top_k", {"top_k": 5}),
    "min_p": Engine("min_p", {"min_p": 0.1}),
    "min_tokens": Engine("min_tokens", {"min_tokens": 2}),
    "repetition_penalty": Engine("repetition_penalty", {"repetition_penalty": 1.2}),
    "ignore_eos": Engine("ignore_eos", {"ignore_eos": True}),
    "stop_token_ids": Engine("stop_token_ids", {"stop_token_ids": [5]}),
}

FIELD_USES: dict[type[BaseModel], dict[str, FieldUse]] = {
    ChatCompletionRequest: {
        **_SAMPLING_FIELDS,
        "messages": Template({"messages": [{"role": "user", "content": "hello there"}]}),
        "max_completion_tokens": Engine("max_tokens", {"max_completion_tokens": 2}),
        "logprobs": Engine("logprobs", {"logprobs": True}),
        "top_logprobs": Engine("logprobs", {"top_logprobs": 3}, given={"logprobs": True}),
        "response_format": Refused({"response_format": {"type": "json_object"}}),
        "tools": Refused({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}),
        "tool_choice": Pending(16, {"tool_choice": "auto"}),
        "modalities": Checked({"modalities": ["text", "audio"]}),
        "audio": Refused({"audio": {"voice": "alloy", "format": "wav"}}),
        "metadata": Logged({"metadata": {"team": "search"}}),
        "safety_identifier": Logged({"safety_identifier": "hashed-user"}),
        "prompt_cache_key": Logged({"prompt_cache_key": "session-1"}),
        "service_tier": Checked({"service_tier": "flex"}),
        "store": Checked({"store": True}),
        "moderation": Refused({"moderation": {"mode": "block"}}),
        "prediction": Refused({"prediction": {"type": "content", "content": "x"}}),
        "prompt_cache_options": Refused({"prompt_cache_options": {"ttl": "30m"}}),
        "prompt_cache_retention": Refused({"prompt_cache_retention": "24h"}),
        "verbosity": Refused({"verbosity": "low"}),
        "web_search_options": Refused({"web_search_options": {}}),
    },
    ChatMessage: {
        "role": Template({"messages": [{"role": "system", "content": "hi"}, _USER_HI]}),
        "content": Template({"messages": [{"role": "user", "content": "other words"}]}),
        "name": Pending(16, {"messages": [{"role": "user", "content": "hi", "name": "bob"}]}),
        "tool_calls": Template(
            {
                "messages": [
                    _USER_HI,
                    {"role": "assistant", "tool_calls": [{"id": "0", "type": "function", "function": {"name": "f"}}]},
                ]
            },
            given={"messages": [_USER_HI, {"role": "assistant", "content": None}]},
        ),
        "tool_call_id": Pending(
            16,
            {"messages": [_USER_HI, {"role": "tool", "content": "42", "tool_call_id": "call-7"}]},
            given={"messages": [_USER_HI, {"role": "tool", "content": "42"}]},
        ),
    },
    TextPart: {
        "type": Checked({"messages": [{"role": "user", "content": [{"type": "video", "text": "x"}]}]}),
        "text": Template({"messages": [{"role": "user", "content": [{"type": "text", "text": "other words"}]}]}),
    },
    ImagePart: {"type": Refused(_IMAGE), "image_url": Refused(_IMAGE)},
    ImageUrl: {"url": Refused(_IMAGE)},
    AudioPart: {"type": Refused(_AUDIO), "input_audio": Refused(_AUDIO)},
    FilePart: {"type": Refused(_FILE), "file": Refused(_FILE)},
    StreamOptions: {
        "include_usage": Reply({"stream_options": {"include_usage": True}}, given={"stream": True}),
        "continuous_usage_stats": Reply({"stream_options": {"continuous_usage_stats": True}}, given={"stream": True}),
    },
    CompletionRequest: {
        **_SAMPLING_FIELDS,
        "prompt": Engine("prompt", {"prompt": "other words"}),
        "logprobs": Engine("logprobs", {"logprobs": 2}),
        "echo": Reply({"echo": True}),
        "suffix": Refused({"suffix": "the end"}),
        "best_of": Refused({"best_of": 2}),
    },
    GenerateRequest: {
        "inputs": Engine("prompt", {"inputs": "other words"}),
        "parameters": Engine("max_tokens", {"parameters": {"max_new_tokens": 2}}),
        "stream": Reply({"stream": True}),
        "add_special_tokens": Engine("prompt", {"add_special_tokens": False}),
    },
    GenerateParameters: {
        "best_of": Engine("requests", {"parameters": {"best_of": 2}}, given={"parameters": {"do_sample": True}}),
        "temperature": Engine("temperature", {"parameters": {"temperature": 0.5}}),
        "repetition_penalty": Engine("repetition_penalty", {"parameters": {"repetition_penalty": 1.2}}),
        "frequency_penalty": Engine("frequency_penalty", {"parameters": {"frequency_penalty": 0.5}}),
        "top_k": Engine("top_k", {"parameters": {"top_k": 5}}),
        "top_p": Engine("top_p", {"parameters": {"top_p": 0.5}}),
        "typical_p": Engine("typical_p", {"parameters": {"typical_p": 0.5}}),
        "do_sample": Engine("temperature", {"parameters": {"do_sample": True}}),
        "max_new_tokens": Engine("max_tokens", {"parameters": {"max_new_tokens": 2}}),
        "return_full_text": Reply({"parameters": {"return_full_text": False}}),
        "stop": Reply({"parameters": {"stop": ["world"]}}),
        "truncate": Engine("prompt", {"parameters": {"truncate": 1}}, given={"inputs": "one two three"}),
        "watermark": Refused({"parameters": {"watermark": True}}),
        "details": Reply({"parameters": {"details": True}}),
        "decoder_input_details": Engine("prompt_logprobs", {"parameters": {"decoder_input_details": True}}),
        "seed": Engine("seed", {"parameters": {"seed": 5}}, given={"parameters": {"do_sample": True, "seed": 6}}),
        "top_n_tokens": Engine("logprobs", {"parameters": {"top_n_tokens": 2}}),
        "grammar": Refused({"parameters": {"grammar": {"type": "regex", "value": "a+"}}}),
        "adapter_id": Checked({"parameters": {"adapter_id": "my-lora-adapter"}}),
    },
}
"""Every request model (and every model nested in one) with a declaration for each of its fields."""
