"""Tools and structured output through the official clients, unchanged, against real servers on loopback: the
embedded tiny model (Hermes-style template) and a tiny model with Llama 3.1's JSON tool format."""

from __future__ import annotations

import json
import urllib.request
from typing import Literal

import jsonschema
import openai
import pytest
from huggingface_hub import InferenceClient
from pydantic import BaseModel, Field

from model_handler.tiny_model import default_model_dir
from tests.live import LiveServer, start_server
from tests.openai_schema import validate
from tests.serve.tool_fixtures import MESSAGES, SCHEMAS, TOOLS, WEATHER, accumulate_stream, check_tool_calls

NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}
"""The tiny Hermes template lets the model open a <think> block unless told not to (as Qwen3's does)."""


class GetWeather(BaseModel):
    """Weather forecast."""

    city: Literal["Paris", "Rome", "Oslo"]
    days: int = Field(ge=1, le=7)


class Verdict(BaseModel):
    verdict: Literal["yes", "no"]
    word: str = Field(max_length=6)
    score: int = Field(ge=0, le=9)


@pytest.fixture(scope="module")
def llama_server() -> LiveServer:
    server = start_server({"HF_MODEL_ID": str(default_model_dir("tiny-llama3-json"))})
    yield server
    server.stop()


def _openai(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="-")


def _sse(url: str, body: dict) -> list[dict]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as reply:
        raw = reply.read().decode()
    frames = [frame for frame in raw.split("\n\n") if frame]
    assert all(frame.startswith("data: ") for frame in frames) and frames[-1] == "data: [DONE]"
    chunks = [json.loads(frame.removeprefix("data: ")) for frame in frames[:-1]]
    for chunk in chunks:
        validate(chunk, "CreateChatCompletionStreamResponse")
    return chunks


def test_openai_tool_calls_whole_and_streamed(live_server):
    client = _openai(live_server)
    kwargs = dict(model="tgi", messages=MESSAGES, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=160)
    raw = client.chat.completions.with_raw_response.create(**kwargs, extra_body=NO_THINKING)
    validate(raw.http_response.json(), "CreateChatCompletionResponse")
    completion = raw.parse()
    assert completion.choices[0].finish_reason == "tool_calls"
    calls = check_tool_calls(completion.choices[0].message.model_dump())
    # The stream, accumulated by the client's own helper, gives the same calls.
    with client.chat.completions.stream(**kwargs, extra_body=NO_THINKING) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].finish_reason == "tool_calls" and final.choices[0].message.content is None
    streamed = final.choices[0].message.tool_calls
    assert [(c.function.name, c.function.arguments) for c in streamed] == [
        (c["function"]["name"], c["function"]["arguments"]) for c in calls
    ]


def test_openai_parse_with_pydantic_tools_and_response_format(live_server):
    client = _openai(live_server)
    common = dict(model="tgi", messages=MESSAGES, temperature=0, max_tokens=160, extra_body=NO_THINKING)
    completion = client.chat.completions.parse(
        **common, tools=[openai.pydantic_function_tool(GetWeather)], tool_choice="required", parallel_tool_calls=False
    )
    calls = completion.choices[0].message.tool_calls
    assert len(calls) == 1 and isinstance(calls[0].function.parsed_arguments, GetWeather)
    parsed = client.chat.completions.parse(**common, response_format=Verdict)
    assert isinstance(parsed.choices[0].message.parsed, Verdict)
    with client.chat.completions.stream(**common, response_format=Verdict) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].message.parsed == parsed.choices[0].message.parsed  # greedy: the same answer


def test_raw_sse_of_tool_calls(live_server):
    body = {
        "model": "tgi",
        "messages": MESSAGES,
        "tools": TOOLS,
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "temperature": 0,
        "max_tokens": 120,
        "stream": True,
        **NO_THINKING,
    }
    chunks = _sse(f"{live_server.url}/v1/chat/completions", body)
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0] == {"role": "assistant", "content": None}  # calls only: no content, as OpenAI streams it
    first_call = next(d["tool_calls"][0] for d in deltas if d.get("tool_calls"))
    assert set(first_call) == {"index", "id", "type", "function"} and first_call["function"]["arguments"] == ""
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "tool_calls"}
    message = accumulate_stream(chunks)
    check_tool_calls(message, 1, 1)


def test_huggingface_hub_tools_and_response_format(live_server):
    client = InferenceClient(base_url=live_server.url)
    reply = client.chat_completion(
        messages=MESSAGES, tools=TOOLS, tool_choice="required", max_tokens=160, temperature=0, extra_body=NO_THINKING
    )
    calls = reply.choices[0].message.tool_calls
    assert calls and reply.choices[0].finish_reason == "tool_calls"
    for call in calls:
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    streamed: dict[int, list[str]] = {}
    for chunk in client.chat_completion(
        messages=MESSAGES,
        tools=TOOLS,
        tool_choice="required",
        max_tokens=160,
        temperature=0,
        stream=True,
        extra_body=NO_THINKING,
    ):
        for call in chunk.choices[0].delta.tool_calls or []:
            entry = streamed.setdefault(call.index, ["", ""])
            entry[0] += call.function.name or ""
            entry[1] += call.function.arguments or ""
    assert [tuple(streamed[i]) for i in sorted(streamed)] == [(c.function.name, c.function.arguments) for c in calls]
    response_format = {"type": "json_schema", "json_schema": {"name": "weather", "schema": WEATHER, "strict": True}}
    answer = client.chat_completion(
        messages=MESSAGES, response_format=response_format, max_tokens=160, temperature=0, extra_body=NO_THINKING
    )
    jsonschema.validate(json.loads(answer.choices[0].message.content), WEATHER)


def test_huggingface_hub_text_generation_with_grammar(live_server):
    client = InferenceClient(base_url=live_server.url)
    grammar = {"type": "json", "value": WEATHER}
    text = client.text_generation("Weather:", grammar=grammar, max_new_tokens=120, return_full_text=False)
    jsonschema.validate(json.loads(text), WEATHER)
    regex = {"type": "regex", "value": "[0-9]{2}-[a-z]{3}"}
    events = client.text_generation("Code:", grammar=regex, stream=True, details=True, max_new_tokens=20)
    streamed = "".join(event.token.text for event in events if not event.token.special)  # EOS shows as a token
    assert len(streamed) == 6 and streamed[2] == "-" and streamed[:2].isdigit() and streamed[3:].isalpha()


def test_llama_json_format_whole_and_streamed(llama_server):
    client = _openai(llama_server)
    kwargs = dict(model="tgi", messages=MESSAGES, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=160)
    completion = client.chat.completions.create(**kwargs)
    calls = check_tool_calls(completion.choices[0].message.model_dump())
    with client.chat.completions.stream(**kwargs) as stream:
        final = stream.get_final_completion()
    assert [(c.function.name, c.function.arguments) for c in final.choices[0].message.tool_calls] == [
        (c["function"]["name"], c["function"]["arguments"]) for c in calls
    ]
    history = [
        *MESSAGES,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": calls[0]["id"], **calls[0]} | {"type": "function"}],
        },
        {"role": "tool", "tool_call_id": calls[0]["id"], "content": "sunny"},
    ]
    rendered = _post(llama_server, "/chat_tokenize", {"messages": history, "tools": TOOLS})["templated_text"]
    arguments = json.dumps(json.loads(calls[0]["function"]["arguments"]))
    assert f'{{"name": "{calls[0]["function"]["name"]}", "parameters": {arguments}}}<|eot_id|>' in rendered
    assert "<|start_header_id|>ipython<|end_header_id|>\n\nsunny<|eot_id|>" in rendered
    follow_up = client.chat.completions.create(model="tgi", messages=history, tools=TOOLS, max_tokens=4, temperature=0)
    assert follow_up.usage.prompt_tokens > completion.usage.prompt_tokens


def test_llama_template_has_no_reasoning_block(llama_server):
    with pytest.raises(openai.BadRequestError) as error:
        _openai(llama_server).chat.completions.create(
            model="tgi", messages=MESSAGES, max_tokens=4, extra_body={"thinking_token_budget": 8}
        )
    assert error.value.body["param"] == "thinking_token_budget"


def _post(server: LiveServer, path: str, body: dict) -> dict:
    request = urllib.request.Request(
        f"{server.url}{path}", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as reply:
        return json.loads(reply.read())
