"""Fixtures for the HTTP layer: the tiny model's tokenizer, one real engine process, apps wired to it (or, for
the few outcomes the real engine cannot produce on demand, to a scripted stand-in)."""

from __future__ import annotations

from pathlib import Path

import pytest

from model_handler.tiny_model import default_model_dir
from serve.tokenizer import TextTokenizer
from tests.serve.helpers import wait_idle


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    return Path(default_model_dir())


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir) -> TextTokenizer:
    return TextTokenizer.load(str(tiny_model_dir))


DEFAULT_REPLY = "Hello world! This is a test."


@pytest.fixture()
def scripted(tiny_model_dir, tokenizer):
    """A scripted engine answering DEFAULT_REPLY then EOS (or cut at max_tokens, finish length): for the tests
    that check what happens before anything reaches the engine, and for outcomes the real one cannot produce."""
    from model_handler.engine_protocol import FinishReason
    from tests.serve.scripted_engine import ScriptedEngine, engine_info, outputs_for

    reply_ids = tokenizer.encode(DEFAULT_REPLY, add_special_tokens=False) + [tokenizer.hf.eos_token_id]

    def script(request):
        n = request.sampling_params.max_tokens
        ids = reply_ids[:n]
        return outputs_for(request, ids, FinishReason.EOS if len(ids) == len(reply_ids) else FinishReason.LENGTH)

    return ScriptedEngine(engine_info(str(tiny_model_dir)), script)


@pytest.fixture()
def make_client():
    """make_client(engine, env) -> a Flask test client of create_app(Settings.from_env(env), engine)."""
    from serve.app import create_app
    from serve.settings import Settings

    def make(engine, env: dict[str, str] | None = None):
        return create_app(Settings.from_env(env or {}), engine).test_client()

    return make


@pytest.fixture(scope="session")
def live_engine():
    """One real engine process (tiny model) for the route tests that generate for real."""
    from tests.live import start_engine

    handle = start_engine()
    yield handle
    handle.stop()


@pytest.fixture(scope="session")
def live_engine_client(live_engine):
    from serve.engine_client import SocketEngineClient

    client = SocketEngineClient(live_engine.address)
    assert client.wait_ready(30), "the engine never reported ready"
    yield client
    client.close()


@pytest.fixture()
def live_client(live_engine_client, make_client):
    """live_client(env) -> a test client of an app on the real engine; afterwards the engine must be idle with
    every KV block free (so each test also checks that finished, stopped and abandoned requests give theirs back)."""
    yield lambda env=None: make_client(live_engine_client, env)
    wait_idle(live_engine_client)
