"""Deploying from the Hub as TGI's SageMaker example does (HF_MODEL_ID=org/model), through container/serve, against
a loopback emulation of the Hub (HF_ENDPOINT): the server downloads only what it reads, logs its start-up as JSON
lines, serves a chat request, restarts offline from the cache, and fails start-up clearly without a model."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request

import openai
import pytest

from tests.hub_emulator import DECOYS, HubEmulator, HubRepo, hub_model_folder
from tests.live import REPO_ROOT, TEST_ENV, free_port, start_server

SHARDED, GATED = "org/tiny-sharded", "org/tiny-gated"
STARTUP_PHASES = ("download", "load", "warm_up", "kv_sizing")
"""On CPU; a GPU adds cuda_graphs."""


@pytest.fixture(scope="module")
def hub(tiny_model_dir, tmp_path_factory):
    folder = hub_model_folder(tiny_model_dir, tmp_path_factory.mktemp("hub") / "tiny-sharded")
    emulator = HubEmulator([HubRepo(SHARDED, folder), HubRepo(GATED, folder, gated=True)]).start()
    yield emulator
    emulator.stop()


def hub_env(hub: HubEmulator, cache_dir, **env: str) -> dict[str, str]:
    return {
        "HF_MODEL_ID": SHARDED,
        "HF_ENDPOINT": hub.url,
        "HF_HUB_CACHE": str(cache_dir),
        "LOG_LEVEL": "INFO",
        "STARTUP_PROGRESS_SECONDS": "0.2",
        **env,
    }


def json_lines(text: str) -> list[dict]:
    """Every stdout line of the container: one JSON object each (what CloudWatch shows)."""
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def chat(url: str) -> str:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(
        model="tgi", messages=[{"role": "user", "content": "Hello"}], max_tokens=8, temperature=0
    )
    assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.completion_tokens >= 1
    return reply.choices[0].message.content


def test_the_server_downloads_serves_and_restarts_offline_from_the_cache(hub, tmp_path):
    server = start_server(hub_env(hub, tmp_path))
    try:
        first_reply = chat(server.url)
        with urllib.request.urlopen(f"{server.url}/info", timeout=10) as reply:
            info = json.loads(reply.read())
    finally:
        server.stop()
    logs = json_lines(server.logs())

    requested = hub.files_requested(SHARDED)
    assert "model.safetensors.index.json" in requested and "consolidated.safetensors" not in requested
    assert not requested & set(DECOYS), "the server asked the Hub for files it never reads"

    # MAX_TOTAL_TOKENS unset: the model's 2048 positions (the 64 MiB test cache holds more); /info says why.
    assert (info["max_total_tokens"], info["max_input_tokens"]) == (2048, 2047)
    assert info["engine"]["max_total_tokens_limited_by"] == "model"
    assert info["engine"]["model_max_position_embeddings"] == 2048
    assert info["engine"]["kv_cache_tokens"] >= 2048

    # Each phase logged its duration; the ready line sums them up.
    done = {line["phase"]: line for line in logs if line.get("progress") == "done" and "seconds" in line}
    assert set(STARTUP_PHASES) <= done.keys() and all(done[p]["seconds"] >= 0 for p in STARTUP_PHASES)
    ready = next(line for line in logs if line["message"] == "engine ready")
    assert set(STARTUP_PHASES) <= ready["phase_seconds"].keys() and ready["max_total_tokens"] == 2048
    # The download and the weight loading reported bytes done of total, from 0 to all of it.
    for phase in ("download", "load"):
        reports = [line for line in logs if line.get("phase") == phase and "bytes_done" in line]
        assert reports[0]["bytes_done"] == 0 and reports[-1]["bytes_done"] == reports[-1]["bytes_total"] > 0, phase
    context = next(line for line in logs if "max_total_tokens_limited_by" in line and "kv_cache_tokens" in line)
    assert (context["max_total_tokens"], context["model_max_position_embeddings"]) == (2048, 2048)

    num_requests = len(hub.requests)
    server = start_server(hub_env(hub, tmp_path, HF_HUB_OFFLINE="1"))
    try:
        assert chat(server.url) == first_reply  # the same weights, greedy
    finally:
        server.stop()
    assert len(hub.requests) == num_requests, "the offline restart contacted the Hub"


def run_serve(env: dict[str, str]) -> tuple[int, str, float]:
    """container/serve until it exits: (exit code, its output, seconds it took)."""
    environ = {**os.environ, **TEST_ENV, "PORT": str(free_port()), **env}
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "container" / "serve"), "serve"],
        env={k: v for k, v in environ.items() if v is not None},
        capture_output=True,
        text=True,
        timeout=120,
    )
    return result.returncode, result.stdout + result.stderr, time.monotonic() - started


@pytest.mark.parametrize(
    "repo_id, reason",
    [("org/no-such-model", "no such model repository on"), (GATED, "is a gated repository on .*set HF_TOKEN")],
)
def test_an_unknown_or_gated_repository_stops_startup_naming_it(hub, tmp_path, repo_id, reason):
    code, output, _ = run_serve(hub_env(hub, tmp_path, HF_MODEL_ID=repo_id))
    assert code != 0
    errors = [line for line in json_lines(output) if line["message"] == "engine failed to start"]
    assert errors and re.search(rf"HF_MODEL_ID='{re.escape(repo_id)}'.*{reason}", errors[0]["error"])


def test_no_model_on_sagemaker_stops_the_container_within_seconds(tmp_path):
    """What the SageMaker SDK sends, no HF_MODEL_ID, an empty /opt/ml/model: a failed start-up, never the demo
    model answering /ping healthy."""
    env = {
        "HF_MODEL_ID": None,
        "SM_MODEL_DIR": str(tmp_path),
        "SAGEMAKER_PROGRAM": "",
        "SAGEMAKER_SUBMIT_DIRECTORY": "",
        "SAGEMAKER_REGION": "us-east-1",
        "SAGEMAKER_CONTAINER_LOG_LEVEL": "20",
    }
    code, output, seconds = run_serve(env)
    assert code != 0
    lines = json_lines(output)
    error = next(line for line in lines if line["message"] == "engine failed to start")["error"]
    assert "HF_MODEL_ID" in error and str(tmp_path) in error and "SAGEMAKER_PROGRAM is set" in error
    assert any(line["message"] == "child process exited; stopping" and line["child"] == "engine" for line in lines)
    assert seconds < 60  # the engine checks before importing torch; the launcher stops at once
    assert not any("tiny demo model" in line["message"] for line in lines)


def test_a_local_run_without_a_model_serves_the_demo_model_and_says_so(live_server):
    """`make serve`, a bare `docker run IMAGE serve`: the package's server was started that way."""
    warnings = [line for line in json_lines(live_server.logs()) if "tiny demo model" in line["message"]]
    assert warnings and warnings[0]["level"] == "WARNING" and "set HF_MODEL_ID" in warnings[0]["message"]
