"""Settings.from_env: defaults, TGI/SageMaker names, aliases, and a clear ValueError for bad values."""

from __future__ import annotations

import logging

import pytest

from serve.settings import Settings


def test_defaults_match_tgi_and_sagemaker():
    settings = Settings.from_env({})
    assert settings.port == 8080
    assert settings.messages_api_enabled is None
    assert (settings.max_stop_sequences, settings.max_top_n_tokens, settings.max_best_of) == (4, 5, 2)
    assert (settings.max_client_batch_size, settings.max_concurrent_requests) == (4, 128)
    assert settings.payload_limit == 2_000_000
    assert settings.api_key is None and settings.served_model_name is None
    assert settings.num_workers == 1 and settings.log_level == logging.INFO


def test_sagemaker_bind_port_wins_over_port():
    assert Settings.from_env({"PORT": "9000"}).port == 9000
    assert Settings.from_env({"PORT": "9000", "SAGEMAKER_BIND_TO_PORT": "8081"}).port == 8081


@pytest.mark.parametrize("raw, expected", [("true", True), ("False", False), ("1", True), ("", None)])
def test_messages_api_enabled(raw, expected):
    assert Settings.from_env({"MESSAGES_API_ENABLED": raw}).messages_api_enabled is expected


@pytest.mark.parametrize(
    "env, name",
    [
        ({"PORT": "70000"}, "PORT"),
        ({"MAX_CONCURRENT_REQUESTS": "0"}, "MAX_CONCURRENT_REQUESTS"),
        ({"MESSAGES_API_ENABLED": "maybe"}, "MESSAGES_API_ENABLED"),
        ({"SAGEMAKER_CONTAINER_LOG_LEVEL": "loud"}, "SAGEMAKER_CONTAINER_LOG_LEVEL"),
        ({"PAYLOAD_LIMIT": "-1"}, "PAYLOAD_LIMIT"),
        ({"TOOL_CALL_PARSER": "pythonic"}, "TOOL_CALL_PARSER"),
    ],
)
def test_bad_values_name_the_variable(env, name):
    with pytest.raises(ValueError, match=name):
        Settings.from_env(env)


def test_tool_call_parser():
    assert Settings.from_env({}).tool_call_parser == "auto"
    for name in ("hermes", "llama3_json", "mistral", "generic", "auto"):
        assert Settings.from_env({"TOOL_CALL_PARSER": name.upper()}).tool_call_parser == name


def test_sagemaker_variables_are_accepted_and_log_level_parsed():
    settings = Settings.from_env(
        {
            "SAGEMAKER_PROGRAM": "",
            "SAGEMAKER_SUBMIT_DIRECTORY": "",
            "SAGEMAKER_REGION": "us-east-1",
            "SAGEMAKER_CONTAINER_LOG_LEVEL": "30",
        }
    )
    assert settings.log_level == logging.WARNING
    assert Settings.from_env({"LOG_LEVEL": "debug"}).log_level == logging.DEBUG


def test_other_settings_are_read():
    settings = Settings.from_env(
        {
            "API_KEY": "secret",
            "CORS_ALLOW_ORIGIN": "https://a.example, https://b.example",
            "SERVED_MODEL_NAME": "my-model",
            "ENGINE_ADDRESS": "ipc:///tmp/x.sock",
            "WEB_CONCURRENCY": "3",
            "MAX_CONCURRENT_REQUESTS": "10",
            "SERVE_ADMISSION_FILE": "/tmp/x/admission",
        }
    )
    assert settings.api_key == "secret"
    assert settings.cors_allow_origins == ("https://a.example", "https://b.example")
    assert settings.served_model_name == "my-model"
    assert settings.engine_address == "ipc:///tmp/x.sock"
    assert settings.num_workers == 3
    assert settings.max_concurrent_requests == 10  # for the whole server, counted in the launcher's table
    assert settings.admission_file == "/tmp/x/admission"


def test_two_http_workers_by_default_where_nvidia_gpus_are_visible(tmp_path):
    from serve.launcher import default_num_workers

    assert default_num_workers(str(tmp_path)) == 1  # no GPU: the CPU engine is far slower than one worker
    (tmp_path / "nvidiactl").touch()  # the driver's control node alone is no GPU
    assert default_num_workers(str(tmp_path)) == 1
    (tmp_path / "nvidia0").touch()
    assert default_num_workers(str(tmp_path)) == 2
