"""The other call formats: Mistral's (a special marker token, then a JSON list; chosen with TOOL_CALL_PARSER) on a
real engine, and the generic format for a template that knows no tools (the prompt describes them)."""

from __future__ import annotations

import json
import shutil

import pytest

from model_handler.tiny_model import default_model_dir
from serve.chat_prompt import GENERIC_INSTRUCTIONS
from serve.engine_client import SocketEngineClient
from tests.live import start_engine
from tests.serve.helpers import openai_chunks, wait_idle
from tests.serve.scripted_engine import ScriptedEngine, engine_info
from tests.serve.tool_fixtures import MESSAGES, TIME, TOOLS, accumulate_stream, same_calls

CHAT = "/v1/chat/completions"
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _model_copy(source, out, template: str | None = None, rename: tuple[str, str] | None = None):
    shutil.copytree(source, out)
    if rename is not None:
        tokenizer = (out / "tokenizer.json").read_text()
        (out / "tokenizer.json").write_text(tokenizer.replace(*rename))
    if template is not None:
        config = json.loads((out / "tokenizer_config.json").read_text())
        config["chat_template"] = template
        (out / "tokenizer_config.json").write_text(json.dumps(config))
        (out / "chat_template.jinja").write_text(template)
    return out


@pytest.fixture(scope="module")
def mistral_engine(tmp_path_factory):
    """The tiny Llama-format model with its <|python_tag|> special token renamed Mistral's [TOOL_CALLS]."""
    source = default_model_dir("tiny-llama3-json")
    model_dir = _model_copy(source, tmp_path_factory.mktemp("mistral") / "m", rename=("<|python_tag|>", "[TOOL_CALLS]"))
    handle = start_engine({"HF_MODEL_ID": str(model_dir)})
    client = SocketEngineClient(handle.address)
    assert client.wait_ready(30)
    yield client
    client.close()
    handle.stop()


def test_mistral_calls_with_short_ids_whole_and_streamed(mistral_engine, make_client):
    client = make_client(mistral_engine, {"TOOL_CALL_PARSER": "mistral"})
    body = {
        "messages": MESSAGES,
        "tools": TOOLS,
        "tool_choice": "required",
        "parallel_tool_calls": False,  # one call in the list (the random model's lists run long)
        "max_tokens": 200,
        "temperature": 0,
    }
    whole = client.post(CHAT, json=body).get_json()
    choice = whole["choices"][0]
    calls = choice["message"]["tool_calls"]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None and len(calls) == 1
    for call in calls:
        assert len(call["id"]) == 9 and call["id"].isalnum()
        json.loads(call["function"]["arguments"])
    streamed = accumulate_stream(openai_chunks(client.post(CHAT, json={**body, "stream": True})))
    assert same_calls(streamed["tool_calls"], calls) and streamed["finish_reason"] == "tool_calls"
    wait_idle(mistral_engine)


@pytest.fixture()
def generic_engine(tmp_path, tiny_model_dir, scripted):
    model_dir = _model_copy(tiny_model_dir, tmp_path / "m", template=CHATML)
    return ScriptedEngine(engine_info(str(model_dir)), scripted.script)


def test_generic_format_describes_the_tools_and_writes_history_as_text(generic_engine, make_client):
    client = make_client(generic_engine)
    history = [
        {"role": "system", "content": "Be brief."},
        *MESSAGES,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_time", "arguments": '{"zone": "CET"}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "12:00"},
    ]
    rendered = client.post("/chat_tokenize", json={"messages": history, "tools": TOOLS}).get_json()["templated_text"]
    assert rendered.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n\nYou may call these functions:\n")
    assert json.dumps(TIME, sort_keys=True) in rendered and GENERIC_INSTRUCTIONS in rendered
    assert (
        '<|im_start|>assistant\n<tool_call>{"name": "get_time", "arguments": {"zone": "CET"}}</tool_call>' in rendered
    )
    assert "<|im_start|>user\n<tool_response>\n12:00\n</tool_response><|im_end|>" in rendered
    reply = client.post(CHAT, json={"messages": MESSAGES, "tools": TOOLS, "tool_choice": "required", "max_tokens": 4})
    constraint = generic_engine.submitted[-1].sampling_params.constraint
    assert reply.status_code == 200 and '"begin": "<tool_call>\\n{\\"name\\": \\"get_time' in constraint.value


def test_tool_prompt_reaches_the_prompt(generic_engine, make_client):
    client = make_client(generic_engine)
    body = {"messages": MESSAGES, "tools": TOOLS, "tool_prompt": "Answer with one call, nothing else."}
    rendered = client.post("/chat_tokenize", json=body).get_json()["templated_text"]
    assert rendered.startswith("<|im_start|>user\n# Tools\n\nYou may call these functions:\n")  # no system message
    assert "Answer with one call, nothing else.\n\nWhat is the weather in Paris?" in rendered
    assert GENERIC_INSTRUCTIONS not in rendered
