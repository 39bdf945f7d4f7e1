"""The whole server (launcher, gunicorn, engine process) on random-weight Gemma 2, Gemma 3, Phi-3 (longrope, partial
rotary) and Mistral v0.1 folders with the tiny model's tokenizer: greedy tokens from TGI's /generate and OpenAI's
/v1/completions equal transformers' generate(), for prompts shorter and longer than the windows and the long-rope
switch."""

from __future__ import annotations

import json
import shutil
import urllib.request
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from model_handler.tiny_model import BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, SPECIAL_TOKENS, default_model_dir
from serve.tokenizer import TextTokenizer
from tests.live import LiveServer, start_server
from tests.model_handler.model_factories import save_random_model, windowed_family_config

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
PROMPTS = {
    "short": "Lists are",  # a few tokens: the window and the long-rope switch are passed while decoding
    "long": "The for statement iterates over the items of any sequence, in the order they appear.",
}
NEW_TOKENS = 24


def build_folder(family: str, out_dir: Path) -> Path:
    """A model folder of the family's test config with the tiny model's vocabulary, tokenizer and special ids."""
    config = windowed_family_config(family)
    tiny = default_model_dir()
    config.vocab_size = json.loads((tiny / "config.json").read_text())["vocab_size"]
    config.bos_token_id, config.eos_token_id, config.pad_token_id = (
        SPECIAL_TOKENS.index(token) for token in (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)
    )
    save_random_model(config, out_dir)
    for name in TOKENIZER_FILES:
        shutil.copy(tiny / name, out_dir / name)
    return out_dir


@pytest.fixture(scope="module", params=["gemma2", "gemma3", "phi3_longrope", "mistral_v01"])
def family_server(request, tmp_path_factory):
    folder = build_folder(request.param, tmp_path_factory.mktemp(request.param))
    server = start_server({"HF_MODEL_ID": str(folder), "MAX_BATCH_PREFILL_TOKENS": "8"})
    yield request.param, folder, server
    server.stop()


def _post(server: LiveServer, path: str, body: dict) -> dict:
    request = urllib.request.Request(
        server.url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as reply:
        return json.load(reply)


def _generate(folder: Path, prompt_ids: list[int], num_tokens: int, ignore_eos: bool = False) -> list[int]:
    hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    extra = {"min_new_tokens": num_tokens} if ignore_eos else {}
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=num_tokens, **extra)
    return out[0, len(prompt_ids) :].tolist()


def test_generate_route_matches_transformers(family_server):
    family, folder, server = family_server
    info = json.load(urllib.request.urlopen(server.url + "/info", timeout=10))
    assert (
        info["engine"]["architecture"]
        == {
            "gemma2": "Gemma2ForCausalLM",
            "gemma3": "Gemma3ForCausalLM",
            "phi3_longrope": "Phi3ForCausalLM",
            "mistral_v01": "MistralForCausalLM",
        }[family]
    )
    tokenizer = TextTokenizer.load(str(folder))
    for name, text in PROMPTS.items():
        reply = _post(
            server, "/generate", {"inputs": text, "parameters": {"max_new_tokens": NEW_TOKENS, "details": True}}
        )
        tokens = [token["id"] for token in reply["details"]["tokens"]]
        prompt_ids = tokenizer.encode(text, add_special_tokens=True)
        assert len(tokens) == NEW_TOKENS, f"{name}: stopped early, the windows were not passed"
        assert tokens == _generate(folder, prompt_ids, NEW_TOKENS), name


def test_completions_on_token_ids_match_transformers(family_server):
    """Prompt token ids straight in, EOS ignored for exactly the tokens asked for (vLLM's min_tokens/ignore_eos)."""
    _, folder, server = family_server
    prompt_ids = list(range(300, 330))  # past every window and the long-rope switch from the start
    reply = _post(
        server,
        "/v1/completions",
        {
            "model": "tgi",
            "prompt": prompt_ids,
            "max_tokens": NEW_TOKENS,
            "temperature": 0,
            "ignore_eos": True,
            "logprobs": 1,
        },
    )
    expected = _generate(folder, prompt_ids, NEW_TOKENS, ignore_eos=True)
    tokenizer = TextTokenizer.load(str(folder))
    assert reply["choices"][0]["logprobs"]["tokens"] == [tokenizer.token_text(i) for i in expected]
