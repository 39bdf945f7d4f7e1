"""Tools, structured output and reasoning end to end on the real engine (tiny model, Hermes-style template, random
weights held to each grammar): every reply parses and validates, whole and streamed, and the two agree."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from tests.openai_schema import validate
from tests.serve.helpers import openai_chunks, sse_frames
from tests.serve.tool_fixtures import (
    MESSAGES,
    TIME,
    TOOLS,
    WEATHER,
    accumulate_stream,
    check_tool_calls,
    same_calls,
)

CHAT = "/v1/chat/completions"
NO_THINKING = {"enable_thinking": False}
"""The tiny template is Qwen3-like: unless told otherwise the model may open a <think> block first, and a model
with random weights may think until max_tokens. Qwen3's non-thinking mode keeps these tests to the answer."""
GREEDY = {"messages": MESSAGES, "max_tokens": 160, "temperature": 0, "chat_template_kwargs": NO_THINKING}


def _whole_and_streamed(client, body: dict) -> tuple[dict, dict, list[dict]]:
    """(whole reply, the streamed choice accumulated, the stream's chunks) for the same greedy request."""
    reply = client.post(CHAT, json=body)
    assert reply.status_code == 200, reply.data
    whole = reply.get_json()
    validate(whole, "CreateChatCompletionResponse")
    chunks = openai_chunks(client.post(CHAT, json={**body, "stream": True}))
    return whole, accumulate_stream(chunks), chunks


@pytest.mark.parametrize("parallel", [True, False])
def test_required_gives_valid_calls_whole_and_streamed(live_client, parallel):
    body = {**GREEDY, "tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": parallel}
    whole, streamed, chunks = _whole_and_streamed(live_client(), body)
    choice = whole["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    calls = check_tool_calls(choice["message"], 1, None if parallel else 1)
    assert streamed["finish_reason"] == "tool_calls" and streamed["content"] is None
    assert same_calls(streamed["tool_calls"], calls)
    finish_chunk = next(c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"])
    assert finish_chunk["choices"][0]["delta"] == {}  # the finish comes in a chunk of its own, as OpenAI's
    assert whole["usage"]["completion_tokens"] <= 160


def test_a_named_tool_is_called_once(live_client):
    named = {"type": "function", "function": {"name": "get_time"}}
    whole, streamed, _ = _whole_and_streamed(live_client(), {**GREEDY, "tools": TOOLS, "tool_choice": named})
    calls = check_tool_calls(whole["choices"][0]["message"], 1, 1)
    assert calls[0]["function"]["name"] == "get_time" and same_calls(streamed["tool_calls"], calls)
    # TGI's spelling of the same choice: the bare function name
    reply = live_client().post(CHAT, json={**GREEDY, "tools": TOOLS, "tool_choice": "get_time"}).get_json()
    assert same_calls(reply["choices"][0]["message"]["tool_calls"], calls)


def test_allowed_tools_limit_the_calls(live_client):
    choice = {"type": "allowed_tools", "allowed_tools": {"mode": "required", "tools": [TOOLS[0]]}}
    choice["allowed_tools"]["tools"] = [{"type": "function", "function": {"name": "get_weather"}}]
    body = {**GREEDY, "n": 2, "temperature": 1.0, "seed": 3, "tools": TOOLS, "tool_choice": choice}
    reply = live_client().post(CHAT, json=body).get_json()
    for choice_body in reply["choices"]:
        calls = check_tool_calls(choice_body["message"])
        assert {c["function"]["name"] for c in calls} == {"get_weather"}


def test_auto_replies_are_text_or_valid_calls(live_client):
    body = {**GREEDY, "n": 3, "temperature": 1.0, "seed": 11, "max_tokens": 40, "tools": TOOLS, "tool_choice": "auto"}
    whole = live_client().post(CHAT, json=body).get_json()
    validate(whole, "CreateChatCompletionResponse")
    for choice in whole["choices"]:
        message = choice["message"]
        if message.get("tool_calls"):
            check_tool_calls(message)
            assert choice["finish_reason"] in ("tool_calls", "length")
        else:
            assert isinstance(message["content"], str) and choice["finish_reason"] in ("stop", "length")


def test_auto_once_the_model_opens_a_call_the_call_is_valid(live_client, tokenizer):
    """A logit bias makes the model open a call at once (the `<tool_call>` token); the grammar holds the rest of it
    to a valid call, and without parallel calls ends the reply there."""
    opener = tokenizer.token_id("<tool_call>")
    body = {
        **GREEDY,
        "tools": TOOLS,
        "tool_choice": "auto",
        "parallel_tool_calls": False,
        "logit_bias": {str(opener): 100},
    }
    whole, streamed, _ = _whole_and_streamed(live_client(), body)
    choice = whole["choices"][0]
    calls = check_tool_calls(choice["message"], 1, 1)
    assert choice["finish_reason"] == "tool_calls" and same_calls(streamed["tool_calls"], calls)
    # Without the bias the same request stays text (the random model never opens a call by itself here).
    plain = live_client().post(CHAT, json={**body, "logit_bias": {}, "max_tokens": 30}).get_json()
    assert "tool_calls" not in plain["choices"][0]["message"] and plain["choices"][0]["message"]["content"]


def test_tool_choice_none_leaves_tools_out(live_client):
    client = live_client()
    plain = client.post(CHAT, json={**GREEDY, "max_tokens": 8}).get_json()
    with_none = client.post(CHAT, json={**GREEDY, "max_tokens": 8, "tools": TOOLS, "tool_choice": "none"}).get_json()
    assert with_none["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"]
    assert with_none["choices"][0]["message"] == plain["choices"][0]["message"]
    with_tools = client.post(CHAT, json={**GREEDY, "max_tokens": 8, "tools": TOOLS}).get_json()
    assert with_tools["usage"]["prompt_tokens"] > plain["usage"]["prompt_tokens"] + 50  # the template lists them


@pytest.mark.parametrize(
    "response_format, schema",
    [
        ({"type": "json_schema", "json_schema": {"name": "w", "schema": WEATHER, "strict": True}}, WEATHER),
        ({"type": "json_schema", "json_schema": {"name": "t", "schema": TIME}}, TIME),  # not strict
        ({"type": "json", "value": WEATHER}, WEATHER),  # TGI
        ({"type": "json", "value": json.dumps(TIME)}, TIME),  # TGI, the schema as a string
        ({"type": "json_schema", "value": {"name": "w", "schema": WEATHER}}, WEATHER),  # TGI's json_schema
        ({"type": "json_object", "value": TIME}, TIME),  # TGI's alias of json
    ],
)
def test_json_response_formats_validate_whole_and_streamed(live_client, response_format, schema):
    body = {**GREEDY, "response_format": response_format}
    whole, streamed, _ = _whole_and_streamed(live_client(), body)
    choice = whole["choices"][0]
    assert choice["finish_reason"] == "stop"
    jsonschema.validate(json.loads(choice["message"]["content"]), schema)
    assert streamed["content"] == choice["message"]["content"] and streamed["finish_reason"] == "stop"


def test_regex_response_format(live_client):
    """Thinking off: the prompt closes the block, so the constraint is the plain regex."""
    body = {
        **GREEDY,
        "response_format": {"type": "regex", "value": "(yes|no), [a-z]{1,8}\\."},
    }
    whole, streamed, _ = _whole_and_streamed(live_client(), body)
    content = whole["choices"][0]["message"]["content"]
    assert re.fullmatch("(yes|no), [a-z]{1,8}\\.", content) and streamed["content"] == content
    assert "reasoning_content" not in whole["choices"][0]["message"]


def test_json_object_is_an_object(live_client):
    """Any JSON object: the random model writes keys of random length, so a finished reply parses and a cut one is
    still the start of an object."""
    body = {**GREEDY, "max_tokens": 40, "response_format": {"type": "json_object"}}
    whole, streamed, _ = _whole_and_streamed(live_client(), body)
    choice = whole["choices"][0]
    content = choice["message"]["content"]
    assert content.lstrip().startswith("{") and streamed["content"] == content
    if choice["finish_reason"] == "stop":
        assert isinstance(json.loads(content), dict)


def test_reasoning_then_a_schema_answer(live_client):
    """The template opens a <think> block (enable_thinking), the budget closes it, the answer follows the schema."""
    body = {
        **GREEDY,
        "chat_template_kwargs": {"enable_thinking": True},
        "thinking_token_budget": 6,
        "response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": WEATHER, "strict": True}},
    }
    whole, streamed, chunks = _whole_and_streamed(live_client(), body)
    message = whole["choices"][0]["message"]
    assert message["reasoning_content"] and "</think>" not in message["reasoning_content"]
    jsonschema.validate(json.loads(message["content"]), WEATHER)
    assert (streamed["reasoning_content"], streamed["content"]) == (message["reasoning_content"], message["content"])
    kinds = [next(iter(c["choices"][0]["delta"])) for c in chunks[1:] if c["choices"] and c["choices"][0]["delta"]]
    assert kinds[0] == "reasoning_content" and kinds[-1] == "content"  # reasoning streams first, then the answer


def test_reasoning_then_a_required_call(live_client):
    body = {
        **GREEDY,
        "chat_template_kwargs": {"enable_thinking": True},
        "thinking_token_budget": 4,
        "tools": TOOLS,
        "tool_choice": "required",
        "parallel_tool_calls": False,
    }
    whole, streamed, chunks = _whole_and_streamed(live_client(), body)
    message = whole["choices"][0]["message"]
    calls = check_tool_calls(message, 1, 1)
    assert message["reasoning_content"] and streamed["reasoning_content"] == message["reasoning_content"]
    assert same_calls(streamed["tool_calls"], calls)
    # /openapi.json documents these fields, and the replies match it.
    document = live_client().get("/openapi.json").get_json()
    schemas = document["components"]["schemas"]
    assert {"tool_calls", "reasoning_content"} <= set(schemas["AssistantMessage"]["properties"])
    assert {"tool_calls", "reasoning_content"} <= set(schemas["ChatDelta"]["properties"])
    components = {"components": document["components"]}
    jsonschema.Draft202012Validator({"$ref": "#/components/schemas/ChatCompletion", **components}).validate(whole)
    chunk_schema = jsonschema.Draft202012Validator({"$ref": "#/components/schemas/ChatCompletionChunk", **components})
    for chunk in chunks:
        chunk_schema.validate(chunk)


def test_history_tools_and_names_reach_the_template(live_client, tokenizer):
    history = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?", "name": "alice"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    body = {"messages": history, "tools": TOOLS}
    rendered = live_client().post("/chat_tokenize", json=body).get_json()["templated_text"]
    assert "<|im_start|>user name=alice\nWeather in Paris?" in rendered
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>' in rendered
    assert "<tool_response>\nsunny\n</tool_response>" in rendered
    assert json.dumps(TIME, sort_keys=True) in rendered  # the tools, as the template lists them (keys as sent)
    reply = live_client().post(CHAT, json={**body, "max_tokens": 4, "temperature": 0}).get_json()
    assert reply["usage"]["prompt_tokens"] == len(tokenizer.encode(rendered, add_special_tokens=False))


def test_a_schema_the_engine_cannot_enforce_is_a_400(live_client):
    schema = {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}
    body = {**GREEDY, "response_format": {"type": "json_schema", "json_schema": {"name": "u", "schema": schema}}}
    reply = live_client().post(CHAT, json=body)
    assert reply.status_code == 400 and "uniqueItems" in reply.get_json()["error"]["message"]
    tgi = live_client().post(
        "/generate", json={"inputs": "x", "parameters": {"grammar": {"type": "regex", "value": "("}}}
    )
    assert tgi.status_code == 422 and tgi.get_json()["error_type"] == "validation"


@pytest.mark.parametrize("route", ["/generate", "/invocations"])
def test_tgi_grammar_on_generate(live_client, route):
    client = live_client()
    parameters = {"max_new_tokens": 120, "grammar": {"type": "json", "value": WEATHER}}
    reply = client.post(route, json={"inputs": "The weather:", "parameters": parameters}).get_json()
    text = (reply[0] if route == "/invocations" else reply)["generated_text"]
    jsonschema.validate(json.loads(text.removeprefix("The weather:")), WEATHER)
    regex = {"max_new_tokens": 20, "grammar": {"type": "regex", "value": "[0-9]{3}-[a-z]{2}"}, "details": True}
    reply = client.post(route, json={"inputs": "Code:", "parameters": regex}).get_json()
    reply = reply[0] if route == "/invocations" else reply
    assert re.fullmatch("(Code:)?[0-9]{3}-[a-z]{2}", reply["generated_text"])
    assert reply["details"]["finish_reason"] == "eos_token"


def test_tgi_grammar_on_generate_stream(live_client):
    parameters = {"max_new_tokens": 120, "grammar": {"type": "json", "value": TIME}}
    events = [
        json.loads(f)
        for f in sse_frames(live_client().post("/generate_stream", json={"inputs": "t", "parameters": parameters}))
    ]
    text = events[-1]["generated_text"]
    assert "".join(e["token"]["text"] for e in events if not e["token"]["special"]) == text
    jsonschema.validate(json.loads(text), TIME)
