"""The model's generation_config.json fills the sampling fields a request leaves unset (as vLLM does), through a real
engine process that reads it; a set field wins; TGI's greedy requests stay greedy; GENERATION_CONFIG=none ignores it."""

from __future__ import annotations

import json
import shutil

import pytest

from serve.engine_client import SocketEngineClient
from tests.live import start_engine
from tests.serve.helpers import wait_idle
from tests.serve.scripted_engine import ScriptedEngine, engine_info

MESSAGES = [{"role": "user", "content": "What is deep learning?"}]
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def model_with_defaults(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("model-with-defaults")
    shutil.copytree(tiny_model_dir, folder, dirs_exist_ok=True)
    config = json.loads((folder / "generation_config.json").read_text())
    config.update(do_sample=True, temperature=0.0, repetition_penalty=1.3, top_k=7)
    (folder / "generation_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module", params=["auto", "none"])
def engine_client(model_with_defaults, request):
    handle = start_engine({"HF_MODEL_ID": str(model_with_defaults), "GENERATION_CONFIG": request.param})
    client = SocketEngineClient(handle.address)
    assert client.wait_ready(30)
    yield request.param, client
    client.close()
    handle.stop()


def test_defaults_fill_what_the_request_leaves_unset(engine_client, make_client):
    source, engine = engine_client
    assert engine.info.sampling_defaults == (
        {"temperature": 0.0, "repetition_penalty": 1.3, "top_k": 7} if source == "auto" else {}
    )
    client = make_client(engine)
    ask = {"messages": MESSAGES, "max_tokens": 12, "ignore_eos": True}
    unset = [client.post(CHAT, json=ask).get_json()["choices"][0]["message"]["content"] for _ in range(2)]
    explicit = client.post(CHAT, json={**ask, "temperature": 0, "repetition_penalty": 1.3}).get_json()
    if source == "auto":
        assert unset[0] == unset[1] == explicit["choices"][0]["message"]["content"]  # greedy, penalised: the file's
    else:
        assert unset[0] != unset[1]  # sampled at temperature 1, unseeded: OpenAI's default
    greedy = {"inputs": "Deep learning is", "parameters": {"max_new_tokens": 12}}
    tgi = client.post("/generate", json=greedy).get_json()["generated_text"]
    assert (
        tgi
        == client.post(
            "/generate", json={**greedy, "parameters": {"max_new_tokens": 12, "repetition_penalty": 1.0}}
        ).get_json()["generated_text"]
    )
    wait_idle(engine)


def test_which_fields_the_defaults_fill(scripted, make_client, tiny_model_dir):
    """On the record that reaches the engine: unset fields take the model's values, set ones keep theirs."""
    defaults = {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1}
    engine = ScriptedEngine(engine_info(str(tiny_model_dir), sampling_defaults=defaults), scripted.script)
    client = make_client(engine)
    client.post(CHAT, json={"messages": MESSAGES})
    client.post("/v1/completions", json={"prompt": "hi", "temperature": 0.2, "top_k": 0, "repetition_penalty": 1.0})
    client.post("/generate", json={"inputs": "hi", "parameters": {"do_sample": True, "top_p": 0.5}})
    client.post("/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 3}})
    chat, completion, sampled, greedy = (r.sampling_params for r in engine.submitted)
    assert (chat.temperature, chat.top_p, chat.top_k, chat.min_p, chat.repetition_penalty) == (0.6, 0.9, 20, 0.05, 1.1)
    assert (completion.temperature, completion.top_k, completion.repetition_penalty, completion.top_p) == (
        0.2,
        0,
        1.0,
        0.9,
    )
    assert (sampled.temperature, sampled.top_p, sampled.top_k, sampled.repetition_penalty) == (0.6, 0.5, 20, 1.1)
    assert (greedy.temperature, greedy.repetition_penalty, greedy.top_k) == (0.0, 1.0, 0)  # TGI greedy stays greedy
