"""The model's sampling defaults from generation_config.json, and GENERATION_CONFIG choosing where they come from."""

from __future__ import annotations

import json
import shutil

import pytest

from model_handler import envs
from model_handler.config import EngineConfig
from model_handler.generation_defaults import read_sampling_defaults


def write(folder, **values) -> None:
    folder.mkdir(exist_ok=True)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 2, **values}))


def test_the_model_folder_gives_its_sampling_values(tmp_path):
    write(tmp_path, do_sample=True, temperature=0.6, top_p=0.9, top_k=20, min_p=0.05, repetition_penalty=1.05)
    assert read_sampling_defaults("auto", tmp_path) == {
        "temperature": 0.6,
        "top_p": 0.9,
        "top_k": 20,
        "min_p": 0.05,
        "repetition_penalty": 1.05,
    }


def test_values_equal_to_transformers_defaults_are_not_defaults(tmp_path):
    write(tmp_path, temperature=1.0, top_p=1.0, top_k=50, repetition_penalty=1.0, max_new_tokens=30)
    assert read_sampling_defaults("auto", tmp_path) == {}  # as vLLM's to_diff_dict


def test_no_file_or_none_gives_nothing(tmp_path):
    assert read_sampling_defaults("auto", tmp_path) == {}
    write(tmp_path, temperature=0.3)
    assert read_sampling_defaults("none", tmp_path) == {}


def test_another_folder_can_be_named(tmp_path):
    write(tmp_path / "model", temperature=0.3)
    write(tmp_path / "other", temperature=0.8)
    source = envs.get({"GENERATION_CONFIG": str(tmp_path / "other")}, "GENERATION_CONFIG")
    assert read_sampling_defaults(source, tmp_path / "model") == {"temperature": 0.8}


@pytest.mark.parametrize(
    "raw, expected", [(None, "auto"), ("", "auto"), ("AUTO", "auto"), ("none", "none"), ("vllm", "none")]
)
def test_source_values(raw, expected):
    assert envs.get({} if raw is None else {"GENERATION_CONFIG": raw}, "GENERATION_CONFIG") == expected


def test_a_folder_without_the_file_stops_start_up(tmp_path):
    with pytest.raises(ValueError, match="GENERATION_CONFIG"):
        envs.get({"GENERATION_CONFIG": str(tmp_path)}, "GENERATION_CONFIG")


@pytest.mark.parametrize("values", [{"temperature": -1}, {"top_p": 0}, {"top_k": 2.5}, {"temperature": "hot"}])
def test_a_bad_value_names_the_file_and_key(tmp_path, values):
    write(tmp_path, **values)
    with pytest.raises(ValueError, match=f"generation_config.json: {next(iter(values))}="):
        read_sampling_defaults("auto", tmp_path)


def test_engine_config_reads_the_variable(tiny_model_dir, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    config = EngineConfig.from_env({"HF_MODEL_ID": str(model_dir), "GENERATION_CONFIG": "none"}, device="cpu")
    assert config.generation_config == "none"
    assert EngineConfig.from_env({"HF_MODEL_ID": str(model_dir)}, device="cpu").generation_config == "auto"
    with pytest.raises(ValueError, match="GENERATION_CONFIG"):
        EngineConfig.from_env({"HF_MODEL_ID": str(model_dir), "GENERATION_CONFIG": "/nowhere"}, device="cpu")
