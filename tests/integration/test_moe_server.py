"""The whole server (launcher, gunicorn, engine process) on each MoE family's random model folder: greedy
replies through TGI's /generate and OpenAI's chat route are transformers' generate() on the same folder."""

from __future__ import annotations

import json
import urllib.request

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.live import start_server
from tests.model_handler.moe_factories import MOE_FAMILIES, build_moe_model_dir

MAX_NEW_TOKENS = 12


@pytest.fixture(scope="module", params=MOE_FAMILIES)
def served(request, tmp_path_factory):
    model_dir = build_moe_model_dir(request.param, tmp_path_factory.mktemp(request.param))
    # A small prefill budget: the longer prompt is prefilled in chunks.
    server = start_server({"HF_MODEL_ID": str(model_dir), "MAX_BATCH_PREFILL_TOKENS": "16"})
    hf_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    yield server, hf_model, AutoTokenizer.from_pretrained(model_dir)
    server.stop()


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as reply:
        return json.loads(reply.read())


def hf_generate(hf_model, prompt_ids: list[int]) -> list[int]:
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=MAX_NEW_TOKENS)
    return out[0, len(prompt_ids) :].tolist()


@pytest.mark.parametrize(
    "inputs", ["def parse(self, text):", "The with statement is used to wrap the execution of a block with methods"]
)
def test_tgi_generate_is_transformers_greedy(served, inputs):
    server, hf_model, tokenizer = served
    body = {"inputs": inputs, "parameters": {"max_new_tokens": MAX_NEW_TOKENS, "details": True}}
    reply = post(f"{server.url}/generate", body)
    expected = hf_generate(hf_model, tokenizer(inputs)["input_ids"])
    assert [t["id"] for t in reply["details"]["tokens"]] == expected
    assert reply["generated_text"] == tokenizer.decode(expected, skip_special_tokens=True)


def test_chat_completion_is_transformers_greedy(served):
    server, hf_model, tokenizer = served
    messages = [{"role": "user", "content": "What does the yield statement do?"}]
    body = {"model": "tgi", "messages": messages, "max_tokens": MAX_NEW_TOKENS, "temperature": 0}
    reply = post(f"{server.url}/v1/chat/completions", body)
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    expected = hf_generate(hf_model, tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert reply["choices"][0]["message"]["content"] == tokenizer.decode(expected, skip_special_tokens=True)
    assert reply["usage"]["completion_tokens"] == len(expected)
