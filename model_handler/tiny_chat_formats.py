"""The chat formats a tiny model folder can be built with: its special tokens and a tool-aware chat template.

Two families' shapes, small enough to read: `hermes` (ChatML with Qwen's `<tool_call>` tags and an optional
`<think>` block, as Qwen2.5/Qwen3 templates render them) and `llama3_json` (Llama 3.1's headers, tools in the
first user message, calls as `{"name", "parameters"}` JSON). Random weights then exercise the whole tool path.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TinyChatFormat:
    """Tokens and template of one chat format; `special_tokens` take the first ids, in this order."""

    name: str
    special_tokens: tuple[str, ...]
    plain_tokens: tuple[str, ...]
    """Single-token markers that decode as text (not special), as Qwen's `<tool_call>` and `<think>` are."""
    bos_token: str
    eos_tokens: tuple[str, ...]
    """The first is the tokenizer's `eos_token`; generation stops at every one (generation_config.json)."""
    pad_token: str
    template: str


# Qwen2.5's tool layout (tools listed in the system turn, calls and results in <tool_call>/<tool_response> tags),
# `name` shown on the role line, and Qwen3's thinking switch: enable_thinking=true opens a <think> block in the
# prompt (as DeepSeek-R1 distills always do), false closes an empty one (Qwen3's "no thinking"), unset leaves it
# to the model. A `reasoning_effort` is shown in a system turn of its own (as gpt-oss's template states it).
HERMES_TEMPLATE = (
    "{%- if reasoning_effort is defined %}{{- '<|im_start|>system\\nReasoning: ' + reasoning_effort + "
    "'<|im_end|>\\n' }}{%- endif %}"
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": '
    "<args-json-object>}\\n</tool_call><|im_end|>\\n' }}"
    "{%- elif messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- set header = '<|im_start|>' + message.role + ((' name=' + message.name) if message.name else '') %}"
    "{%- if message.role == 'system' and loop.first %}"
    "{%- elif message.role == 'assistant' and message.tool_calls %}"
    "{{- header }}{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for call in message.tool_calls %}"
    '{{- \'\\n<tool_call>\\n{"name": "\' + call.function.name + \'", "arguments": \' }}'
    "{{- call.function.arguments | tojson }}{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- else %}"
    "{{- header + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking %}{{- '<think>\\n' }}"
    "{%- elif enable_thinking is defined %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)

HERMES = TinyChatFormat(
    name="hermes",
    special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"),
    plain_tokens=("<tool_call>", "</tool_call>", "<think>", "</think>"),
    bos_token="<|endoftext|>",
    eos_tokens=("<|im_end|>",),
    pad_token="<|pad|>",
    template=HERMES_TEMPLATE,
)

# Llama 3.1's layout: "Environment: ipython" in the system turn when tools are given, the tools and the call format
# in the first user turn, calls as one JSON object per call, results in `ipython` turns.
LLAMA3_JSON_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages[0].role == 'system' %}"
    "{%- set system_message = messages[0].content %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{%- if tools %}{{- 'Environment: ipython\\n\\n' }}{%- endif %}"
    "{{- system_message + '<|eot_id|>' }}"
    "{%- set ns = namespace(tools_shown=false) %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'tool' or message.role == 'ipython' %}"
    "{{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' + message.content + '<|eot_id|>' }}"
    "{%- elif message.role == 'assistant' and message.tool_calls %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- for call in message.tool_calls %}"
    "{%- if not loop.first %}{{- '; ' }}{%- endif %}"
    "{{- '{\"name\": \"' + call.function.name + '\", \"parameters\": ' + (call.function.arguments | tojson) + '}' }}"
    "{%- endfor %}"
    "{{- '<|eot_id|>' }}"
    "{%- else %}"
    "{{- '<|start_header_id|>' + message.role + '<|end_header_id|>\\n\\n' }}"
    "{%- if tools and message.role == 'user' and not ns.tools_shown %}"
    "{%- set ns.tools_shown = true %}"
    "{{- 'Given the following functions, please respond with a JSON for a function call with its proper arguments "
    "that best answers the given prompt.\\n\\nRespond in the format "
    '{\\"name\\": function name, \\"parameters\\": dictionary of argument name and its value}. '
    "Do not use variables.\\n\\n' }}"
    "{%- for tool in tools %}{{- (tool | tojson) + '\\n\\n' }}{%- endfor %}"
    "{%- endif %}"
    "{{- message.content + '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

LLAMA3_JSON = TinyChatFormat(
    name="llama3_json",
    special_tokens=(
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
        "<|eom_id|>",
        "<|python_tag|>",
        "<|finetune_right_pad_id|>",
    ),
    plain_tokens=(),
    bos_token="<|begin_of_text|>",
    eos_tokens=("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"),
    pad_token="<|finetune_right_pad_id|>",
    template=LLAMA3_JSON_TEMPLATE,
)

CHAT_FORMATS: dict[str, TinyChatFormat] = {f.name: f for f in (HERMES, LLAMA3_JSON)}
