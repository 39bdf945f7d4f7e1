"""HF_MODEL_ID from the Hub: only the files the engine reads are fetched, against a loopback emulation of the
Hub's HTTP API driven by the real huggingface_hub client; the cache serves an offline restart; an unknown or
gated repository stops start-up naming it; the download reports bytes done of total as it goes."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
from safetensors.torch import load_file

from model_handler.hub_download import HubOptions, download_model
from model_handler.hub_files import LayoutError, select_files
from model_handler.weights import iter_checkpoint
from tests.hub_emulator import DECOYS, HubEmulator, HubRepo, hub_model_folder

SHARDED = "org/tiny-sharded"
GATED = "org/tiny-gated"
ENGINE_FILES = [
    "chat_template.jinja",
    "config.json",
    "generation_config.json",
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
    "model.safetensors.index.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
]


# ---- the choice, from a file list -------------------------------------------------------------


def no_index(name: str) -> dict:
    raise AssertionError(f"{name} should not be read")


def test_a_mistral_like_repository_yields_the_sharded_checkpoint_and_the_tokenizer_only():
    """Mistral-7B-Instruct-v0.3's listing: its 14.5 GB consolidated.safetensors, Mistral's own tokenizer files and
    params.json are never fetched."""
    listing = [
        ".gitattributes",
        "README.md",
        "config.json",
        "consolidated.safetensors",
        "generation_config.json",
        "model-00001-of-00003.safetensors",
        "model-00002-of-00003.safetensors",
        "model-00003-of-00003.safetensors",
        "model.safetensors.index.json",
        "params.json",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer.model",
        "tokenizer.model.v3",
        "tokenizer_config.json",
        "pytorch_model.bin",
        "model.gguf",
        "original/consolidated.00.pth",
        "original/params.json",
        "additional_chat_templates/tool_use.jinja",
    ]
    index = {"weight_map": {f"w{i}": f"model-0000{i % 3 + 1}-of-00003.safetensors" for i in range(9)}}
    assert select_files(listing, lambda name: index) == [
        "additional_chat_templates/tool_use.jinja",
        "config.json",
        "generation_config.json",
        "model-00001-of-00003.safetensors",
        "model-00002-of-00003.safetensors",
        "model-00003-of-00003.safetensors",
        "model.safetensors.index.json",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]


def test_without_tokenizer_json_the_vocabulary_files_come_along():
    listing = ["config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json", "consolidated.pth"]
    assert select_files(listing, no_index) == [
        "config.json",
        "model.safetensors",
        "tokenizer.model",
        "tokenizer_config.json",
    ]
    listing = ["config.json", "model.safetensors", "vocab.json", "merges.txt", "qwen.tiktoken", "chat_template.json"]
    assert select_files(listing, no_index) == [
        "chat_template.json",
        "config.json",
        "merges.txt",
        "model.safetensors",
        "qwen.tiktoken",
        "vocab.json",
    ]


def test_a_repository_without_what_the_engine_loads_is_refused_before_any_download():
    with pytest.raises(LayoutError, match="neither model.safetensors nor model.safetensors.index.json.*pytorch_model"):
        select_files(["config.json", "pytorch_model.bin", "tokenizer.json"], no_index)
    index = {"weight_map": {"x": "a.safetensors", "y": "b.safetensors"}}
    with pytest.raises(LayoutError, match="names shard files the repository lacks: b.safetensors"):
        select_files(["config.json", "model.safetensors.index.json", "a.safetensors"], lambda _: index)
    with pytest.raises(LayoutError, match="no config.json"):
        select_files(["model.safetensors"], no_index)


# ---- against the emulated Hub -----------------------------------------------------------------


@pytest.fixture(scope="module")
def hub(tiny_model_dir, tmp_path_factory):
    folder = hub_model_folder(tiny_model_dir, tmp_path_factory.mktemp("hub") / "tiny-sharded")
    emulator = HubEmulator([HubRepo(SHARDED, folder), HubRepo(GATED, folder, gated=True)]).start()
    yield emulator
    emulator.stop()


def options(hub: HubEmulator, cache_dir, **changes) -> HubOptions:
    base = HubOptions(
        revision=None, token=None, cache_dir=str(cache_dir), endpoint=hub.url, offline=False, progress_interval_s=10.0
    )
    return dataclasses.replace(base, **changes)


def test_only_the_files_the_engine_reads_are_ever_requested(hub, tiny_model_dir, tmp_path):
    path = download_model(SHARDED, options(hub, tmp_path))
    assert sorted(p.name for p in path.iterdir()) == ENGINE_FILES
    assert hub.files_requested(SHARDED) == set(ENGINE_FILES)
    assert not hub.files_requested(SHARDED) & set(DECOYS)
    # The shards hold the model's tensors, bit for bit.
    original = load_file(str(tiny_model_dir / "model.safetensors"))
    loaded = dict(iter_checkpoint(path))
    assert loaded.keys() == original.keys()
    assert all(torch.equal(loaded[name], original[name]) for name in original)


def test_an_offline_restart_reads_the_cache_and_asks_the_hub_nothing(hub, tmp_path):
    first = download_model(SHARDED, options(hub, tmp_path))
    num_requests = len(hub.requests)
    assert download_model(SHARDED, options(hub, tmp_path, offline=True)) == first
    assert len(hub.requests) == num_requests


def test_offline_without_the_cache_names_the_repository(hub, tmp_path):
    with pytest.raises(ValueError, match=rf"HF_MODEL_ID='{SHARDED}'.*offline \(HF_HUB_OFFLINE is set\)"):
        download_model(SHARDED, options(hub, tmp_path, offline=True))


def test_unknown_repository_and_revision_stop_startup_naming_them(hub, tmp_path):
    with pytest.raises(ValueError, match=rf"HF_MODEL_ID='org/no-such-model': no such model repository on {hub.url}"):
        download_model("org/no-such-model", options(hub, tmp_path))
    with pytest.raises(ValueError, match=rf"HF_MODEL_REVISION='v9' does not exist in '{SHARDED}'"):
        download_model(SHARDED, options(hub, tmp_path, revision="v9"))


def test_a_gated_repository_needs_the_token(hub, tmp_path):
    with pytest.raises(ValueError, match=rf"HF_MODEL_ID='{GATED}' is a gated repository on {hub.url}: set HF_TOKEN"):
        download_model(GATED, options(hub, tmp_path))
    assert not any(r.authorized for r in hub.requests if GATED in r.path)
    path = download_model(GATED, options(hub, tmp_path, token=hub.token))
    assert sorted(p.name for p in path.iterdir()) == ENGINE_FILES


def test_the_download_logs_bytes_done_of_total_as_it_goes(tiny_model_dir, tmp_path, caplog):
    """A slow link (a few MB/s): JSON-ready log records at the start, every interval, and at the end."""
    folder = hub_model_folder(tiny_model_dir, tmp_path / "repo", num_shards=4)
    slow = HubEmulator([HubRepo(SHARDED, folder)], bytes_per_second=4e6).start()
    try:
        with caplog.at_level(logging.INFO, logger="model_handler.startup"):
            path = download_model(SHARDED, options(slow, tmp_path / "cache", progress_interval_s=0.2))
    finally:
        slow.stop()
    total = sum(p.stat().st_size for p in path.iterdir())
    reports = [r for r in caplog.records if getattr(r, "phase", None) == "download" and hasattr(r, "bytes_done")]
    assert [r.progress for r in reports[:1] + reports[-1:]] == ["started", "done"]
    assert all(r.bytes_total == total for r in reports)
    assert (reports[0].bytes_done, reports[-1].bytes_done) == (0, total)
    running = [r.bytes_done for r in reports if r.progress == "running"]
    assert running and all(0 < done < total for done in running) and running == sorted(running)
