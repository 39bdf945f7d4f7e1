"""The embedded tiny model: built offline, loadable by transformers, cached, and safe to build concurrently."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from model_handler import tiny_chat_formats, tiny_model
from model_handler.model_config import ModelConfig

REPO = Path(__file__).resolve().parents[2]
MESSAGES = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Hi!"}]
CHATML = "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
SMALL = dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)


def test_build_needs_no_network(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the tiny model build tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tiny_model.build_tiny_model(tmp_path / "m", **SMALL)
    assert out == tmp_path / "m"
    expected = {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    }
    assert expected <= {p.name for p in out.iterdir()}
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2


@pytest.mark.parametrize("loader", [AutoTokenizer, PreTrainedTokenizerFast])
def test_tokenizer_loads_renders_chatml_and_round_trips(tiny_model_dir, loader):
    tokenizer = loader.from_pretrained(tiny_model_dir)
    assert (tokenizer.eos_token, tokenizer.bos_token, tokenizer.pad_token) == ("<|im_end|>", "<|endoftext|>", "<|pad|>")
    assert tokenizer.eos_token_id == 2
    assert tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True) == CHATML
    text = "def f(x):\n    return x ** 2  # naïve ünïcode 🎉"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    chat_ids = tokenizer.encode(CHATML, add_special_tokens=False)
    assert chat_ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")  # special tokens stay single tokens
    assert tokenizer.decode(chat_ids) == CHATML


def test_model_reloads_with_transformers_and_generates(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.tie_word_embeddings
    assert model.generation_config.eos_token_id == 2
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt = tokenizer(CHATML, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape[1] == prompt["input_ids"].shape[1] + 4


@pytest.mark.parametrize("text", [CHATML, "Deep learning is"])
def test_greedy_text_of_the_default_model_varies(tiny_model_dir, text):
    # With HF's 0.02 init the model echoes its input: greedy output is one token repeated (1-2 distinct in 32).
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False)
    new_ids = out[0, prompt["input_ids"].shape[1] :].tolist()
    assert len(new_ids) == 32 and len(set(new_ids)) >= 24, new_ids


def test_init_std_sets_the_weights_and_norms_stay_one(tmp_path):
    from safetensors.numpy import load_file

    out = tiny_model.build_tiny_model(tmp_path / "m", **SMALL, init_std=0.3)
    weights = load_file(str(out / "model.safetensors"))
    assert abs(float(weights["model.embed_tokens.weight"].std()) - 0.3) < 0.01
    assert abs(float(weights["model.layers.0.mlp.up_proj.weight"].std()) - 0.3) < 0.01
    norms = [w for name, w in weights.items() if "norm" in name]
    assert len(norms) == 2 * SMALL["num_layers"] + 1 and all((w == 1).all() for w in norms)
    assert json.loads((out / "config.json").read_text())["initializer_range"] == 0.3
    with pytest.raises(ValueError, match="init_std"):
        tiny_model.build_tiny_model(tmp_path / "bad", **SMALL, init_std=0.0)


def test_model_config_of_the_tiny_model(tiny_model_dir):
    config = ModelConfig.from_model_dir(tiny_model_dir)
    assert (config.architecture, config.vocab_size, config.num_layers) == ("LlamaForCausalLM", 4096, 4)
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (4, 2, 64)
    assert config.eos_token_ids == [2] and config.bos_token_id == 0 and config.tie_word_embeddings


def test_cache_is_reused_on_the_second_call(tmp_path, monkeypatch):
    monkeypatch.setenv("TINY_MODEL_CACHE", str(tmp_path))
    monkeypatch.setitem(tiny_model.PRESETS, "small", tiny_model.TinyModelSpec(**SMALL))
    first = tiny_model.default_model_dir("small")
    assert first.parent == tmp_path and (first / "model.safetensors").is_file()

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the cached model was rebuilt")

    monkeypatch.setattr(tiny_model, "build_tiny_model", no_rebuild)
    assert tiny_model.default_model_dir("small") == first
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary folder left behind


def test_cache_key_changes_with_the_parameters():
    spec = tiny_model.TinyModelSpec(**SMALL)
    for change in ({"seed": 1}, {"init_std": 0.05}):
        other = tiny_model.TinyModelSpec(**{**SMALL, **change})
        assert tiny_model.model_dir_name("small", spec) != tiny_model.model_dir_name("small", other)
    same = tiny_model.TinyModelSpec(**SMALL)
    assert tiny_model.model_dir_name("small", spec) == tiny_model.model_dir_name("small", same)


def test_cache_key_changes_with_the_chat_format_and_its_template(monkeypatch):
    """A folder cached before a template change is never served again: the template is part of the key."""
    spec = tiny_model.TinyModelSpec(**SMALL)
    before = tiny_model.model_dir_name("small", spec)
    llama = tiny_model.TinyModelSpec(**SMALL, chat_format="llama3_json")
    assert tiny_model.model_dir_name("small", llama) != before
    edited = dataclasses.replace(tiny_chat_formats.HERMES, template=tiny_chat_formats.HERMES.template + " ")
    monkeypatch.setitem(tiny_chat_formats.CHAT_FORMATS, "hermes", edited)
    assert tiny_model.model_dir_name("small", spec) != before


TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
CALL_HISTORY = [
    {"role": "user", "content": "go", "name": "ann"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"id": "1", "type": "function", "function": {"name": "f", "arguments": {"x": 1}}}],
    },
    {"role": "tool", "tool_call_id": "1", "content": "done"},
]


def test_hermes_template_renders_tools_calls_results_names_and_thinking(tiny_model_dir):
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tiny_model_dir)
    text = tokenizer.apply_chat_template(CALL_HISTORY, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\n# Tools\n") and json.dumps(TOOLS[0]) in text
    assert "<|im_start|>user name=ann\ngo<|im_end|>" in text
    assert '<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call><|im_end|>' in text
    assert "<|im_start|>user\n<tool_response>\ndone\n</tool_response><|im_end|>" in text
    render = tokenizer.apply_chat_template
    assert render(MESSAGES, tokenize=False, add_generation_prompt=True, enable_thinking=True) == CHATML + "<think>\n"
    closed = render(MESSAGES, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert closed == CHATML + "<think>\n\n</think>\n\n"
    for marker in ("<tool_call>", "</tool_call>", "<think>", "</think>"):  # one token each, shown as text
        (token_id,) = tokenizer.encode(marker, add_special_tokens=False)
        assert token_id < 8 and tokenizer.decode([token_id], skip_special_tokens=True) == marker


def test_llama3_json_template_and_tokens(tmp_path):
    out = tiny_model.build_tiny_model(tmp_path / "m", **SMALL, chat_format="llama3_json")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(out)
    text = tokenizer.apply_chat_template(CALL_HISTORY, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython")
    assert '{"name": "f", "parameters": {"x": 1}}<|eot_id|>' in text
    assert "<|start_header_id|>ipython<|end_header_id|>\n\ndone<|eot_id|>" in text
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    config = ModelConfig.from_model_dir(out)
    assert config.eos_token_ids == tokenizer.convert_tokens_to_ids(["<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"])
    assert tokenizer.eos_token == "<|eot_id|>" and tokenizer.convert_tokens_to_ids("<|python_tag|>") < 8


def test_concurrent_builds_all_see_one_complete_folder(tmp_path):
    env = {**os.environ, "TINY_MODEL_CACHE": str(tmp_path), "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "model_handler.tiny_model"],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    outputs = [proc.communicate(timeout=120) for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), [err for _, err in outputs]
    paths = {out.strip() for out, _ in outputs}
    assert len(paths) == 1
    folder = Path(paths.pop())
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]
    assert ModelConfig.from_model_dir(folder).vocab_size == 4096
    PreTrainedTokenizerFast.from_pretrained(folder)


def test_cli_builds_into_a_given_folder(tmp_path, capsys):
    tiny_model.main([str(tmp_path / "out")])
    assert capsys.readouterr().out.strip() == str(tmp_path / "out")
    assert (tmp_path / "out" / "config.json").is_file()


def test_presets_include_the_100m_benchmark_model():
    spec = tiny_model.PRESETS["llama-100m"]
    head_dim = spec.hidden_size // spec.num_heads
    per_layer = (
        spec.hidden_size * head_dim * (2 * spec.num_heads + 2 * spec.num_kv_heads)
        + 3 * spec.hidden_size * spec.intermediate_size
        + 2 * spec.hidden_size
    )
    num_params = spec.num_layers * per_layer + spec.vocab_size * spec.hidden_size + spec.hidden_size
    assert 100e6 < num_params < 120e6
    assert spec.init_std < tiny_model.PRESETS["tiny"].init_std  # wider layers sum more terms: a smaller std
    with pytest.raises(ValueError, match="unknown tiny model preset"):
        tiny_model.default_model_dir("no-such-preset")
