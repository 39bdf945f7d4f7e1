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
from serve.schemas_tools import (
    AllowedTool,
    AllowedTools,
    AllowedToolsChoice,
    CalledFunction,
    FunctionDefinition,
    FunctionName,
    FunctionTool,
    JsonObjectFormat,
    JsonSchemaFormat,
    JsonSchemaSpec,
    MessageToolCall,
    NamedToolChoice,
    RegexFormat,
    TextFormat,
    TgiJsonFormat,
    TgiJsonObjectGrammar,
    TgiJsonSchemaGrammar,
)


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

_OBJECT = {"type": "object", "properties": {"a": {"type": "integer"}}}
_F = {"type": "function", "function": {"name": "f", "parameters": _OBJECT}}
_G = {"type": "function", "function": {"name": "g", "parameters": _OBJECT}}
_TOOLS = {"tools": [_F, _G]}
_SCHEMA_FORMAT = {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": _OBJECT}}}
_CALL = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}


def _history(call: dict) -> dict:
    return {"messages": [_USER_HI, {"role": "assistant", "content": None, "tool_calls": [call]}]}


def _allowed(mode: str, *names: str) -> dict:
    tools = [{"type": "function", "function": {"name": name}} for name in names]
    return {"tool_choice": {"type": "allowed_tools", "allowed_tools": {"mode": mode, "tools": tools}}}


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
        "response_format": Engine("constraint", {"response_format": {"type": "json_object"}}),
        "tools": Engine("constraint", _TOOLS),
        "tool_choice": Engine("constraint", {"tool_choice": "required"}, given=_TOOLS),
        "parallel_tool_calls": Engine("constraint", {"parallel_tool_calls": False}, given=_TOOLS),
        "tool_prompt": Template({"tool_prompt": "Call f."}, given=_TOOLS),
        "chat_template_kwargs": Template({"chat_template_kwargs": {"enable_thinking": False}}),
        "thinking_token_budget": Engine(
            "constraint", {"thinking_token_budget": 4}, given={"chat_template_kwargs": {"enable_thinking": True}}
        ),
        "reasoning_effort": Template({"reasoning_effort": "low"}),
        "functions": Refused({"functions": [{"name": "f"}]}),
        "function_call": Refused({"function_call": "auto"}),
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
        "name": Template({"messages": [{"role": "user", "content": "hi", "name": "bob"}]}),
        "tool_calls": Template(_history(_CALL), given={"messages": [_USER_HI, {"role": "assistant", "content": None}]}),
        "tool_call_id": Template(
            {"messages": [_USER_HI, {"role": "tool", "content": "42", "tool_call_id": "call-7"}]},
            given={"messages": [_USER_HI, {"role": "tool", "content": "42"}]},
        ),
        "reasoning_content": Template(
            {"messages": [_USER_HI, {"role": "assistant", "content": "a", "reasoning_content": "I thought."}]},
            given={"messages": [_USER_HI, {"role": "assistant", "content": "a"}]},
        ),
    },
    FunctionTool: {
        "type": Checked({"tools": [{"type": "custom", "function": {"name": "f"}}]}),
        "function": Engine("constraint", {"tools": [_G]}, given={"tools": [_F]}),
    },
    FunctionDefinition: {
        "name": Engine(
            "constraint", {"tools": [{"type": "function", "function": {"name": "g"}}]}, given={"tools": [_F]}
        ),
        "description": Template(
            {"tools": [{"type": "function", "function": {"name": "f", "description": "Adds.", "parameters": _OBJECT}}]},
            given={"tools": [_F]},
        ),
        "parameters": Engine(
            "constraint", {"tools": [_F]}, given={"tools": [{"type": "function", "function": {"name": "f"}}]}
        ),
        "strict": Engine(
            "constraint",
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": _OBJECT, "strict": True}}]},
            given={"tools": [_F]},
        ),
    },
    NamedToolChoice: {
        "type": Checked({"tool_choice": {"type": "custom", "function": {"name": "f"}}}, given=_TOOLS),
        "function": Engine(
            "constraint", {"tool_choice": {"type": "function", "function": {"name": "g"}}}, given=_TOOLS
        ),
    },
    FunctionName: {
        "name": Engine(
            "constraint",
            {"tool_choice": {"type": "function", "function": {"name": "g"}}},
            given={**_TOOLS, "tool_choice": {"type": "function", "function": {"name": "f"}}},
        ),
    },
    AllowedToolsChoice: {
        "type": Checked(
            {"tool_choice": {"type": "custom", "allowed_tools": {"mode": "auto", "tools": []}}}, given=_TOOLS
        ),
        "allowed_tools": Engine("constraint", _allowed("auto", "f"), given=_TOOLS),
    },
    AllowedTools: {
        "mode": Engine("constraint", _allowed("required", "f"), given={**_TOOLS, **_allowed("auto", "f")}),
        "tools": Engine("constraint", _allowed("auto", "g"), given={**_TOOLS, **_allowed("auto", "f")}),
    },
    AllowedTool: {
        "type": Checked(
            {"tool_choice": {"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": [{"type": "x"}]}}},
            given=_TOOLS,
        ),
        "function": Engine("constraint", _allowed("auto", "g"), given={**_TOOLS, **_allowed("auto", "f")}),
    },
    MessageToolCall: {
        "id": Template(_history({**_CALL, "id": "c2"}), given=_history(_CALL)),
        "type": Checked(_history({**_CALL, "type": "custom"})),
        "function": Template(_history({**_CALL, "function": {"name": "g", "arguments": "{}"}}), given=_history(_CALL)),
    },
    CalledFunction: {
        "name": Template(
            _history({**_CALL, "function": {"name": "g", "arguments": '{"a": 1}'}}), given=_history(_CALL)
        ),
        "arguments": Template(
            _history({**_CALL, "function": {"name": "f", "arguments": '{"a": 2}'}}), given=_history(_CALL)
        ),
    },
    TextFormat: {"type": Checked({"response_format": {"type": "xml"}}, given={"response_format": {"type": "text"}})},
    JsonObjectFormat: {
        "type": Engine("constraint", {"response_format": {"type": "json_object"}}),
        "value": Engine(
            "constraint",
            {"response_format": {"type": "json_object", "value": _OBJECT}},
            given={"response_format": {"type": "json_object"}},
        ),
    },
    JsonSchemaFormat: {
        "type": Engine("constraint", _SCHEMA_FORMAT),
        "json_schema": Engine("constraint", _SCHEMA_FORMAT),
        "value": Engine("constraint", {"response_format": {"type": "json_schema", "value": {"schema": _OBJECT}}}),
    },
    JsonSchemaSpec: {
        "name": Logged({"response_format": {"json_schema": {"name": "y"}}}, given=_SCHEMA_FORMAT),
        "description": Template({"response_format": {"json_schema": {"description": "A sum."}}}, given=_SCHEMA_FORMAT),
        "schema": Engine(
            "constraint", {"response_format": {"json_schema": {"schema": {"type": "integer"}}}}, given=_SCHEMA_FORMAT
        ),
        "strict": Engine("constraint", {"response_format": {"json_schema": {"strict": True}}}, given=_SCHEMA_FORMAT),
    },
    TgiJsonFormat: {
        "type": Engine("constraint", {"response_format": {"type": "json", "value": _OBJECT}}),
        "value": Engine(
            "constraint",
            {"response_format": {"type": "json", "value": {"type": "integer"}}},
            given={"response_format": {"type": "json", "value": _OBJECT}},
        ),
    },
    RegexFormat: {
        "type": Engine("constraint", {"response_format": {"type": "regex", "value": "a+"}}),
        "value": Engine(
            "constraint",
            {"response_format": {"type": "regex", "value": "b+"}},
            given={"response_format": {"type": "regex", "value": "a+"}},
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
        "grammar": Engine("constraint", {"parameters": {"grammar": {"type": "regex", "value": "a+"}}}),
        "adapter_id": Checked({"parameters": {"adapter_id": "my-lora-adapter"}}),
    },
    TgiJsonObjectGrammar: {
        "type": Engine("constraint", {"parameters": {"grammar": {"type": "json_object", "value": _OBJECT}}}),
        "value": Engine(
            "constraint",
            {"parameters": {"grammar": {"type": "json_object", "value": {"type": "integer"}}}},
            given={"parameters": {"grammar": {"type": "json_object", "value": _OBJECT}}},
        ),
    },
    TgiJsonSchemaGrammar: {
        "type": Engine(
            "constraint", {"parameters": {"grammar": {"type": "json_schema", "value": {"schema": _OBJECT}}}}
        ),
        "value": Engine(
            "constraint",
            {"parameters": {"grammar": {"type": "json_schema", "value": {"schema": {"type": "integer"}}}}},
            given={"parameters": {"grammar": {"type": "json_schema", "value": {"schema": _OBJECT}}}},
        ),
    },
}
"""Every request model (and every model nested in one) with a declaration for each of its fields."""
