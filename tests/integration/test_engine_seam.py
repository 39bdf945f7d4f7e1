"""The seam between HTTP workers and the engine process: a real engine process and a real SocketEngineClient."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
import uuid

import gevent
import pytest

from model_handler.constraints import Constraint, ConstraintKind
from model_handler.engine_protocol import EngineRequest, FinishReason
from model_handler.sampling_params import SamplingParams
from serve.engine_client import EngineDeadError, SocketEngineClient
from tests import cpu_kernels
from tests.live import REPO_ROOT, start_engine


@pytest.fixture(scope="module")
def engine():
    handle = start_engine()
    yield handle
    handle.stop()


@pytest.fixture()
def client(engine):
    client = SocketEngineClient(engine.address)
    assert client.wait_ready(30), "engine never reported ready to a new client"
    start_free = client.last_heartbeat.num_free_blocks
    yield client
    # Every test must leave the KV cache as it found it (aborted and finished requests free their blocks).
    for _ in range(40):
        gevent.sleep(0.25)
        if client.last_heartbeat.num_free_blocks == start_free and client.last_heartbeat.num_running == 0:
            break
    assert client.last_heartbeat.num_free_blocks == start_free
    client.close()


def _request(client: SocketEngineClient, prompt: list[int], **params) -> EngineRequest:
    return EngineRequest(uuid.uuid4().hex, prompt, SamplingParams(**params))


def _collect(client: SocketEngineClient, request: EngineRequest) -> tuple[list[int], FinishReason | None]:
    tokens: list[int] = []
    reason = None
    for output in client.submit(request):
        tokens += output.new_token_ids
        reason = output.finish_reason
    return tokens, reason


def test_info_describes_the_loaded_model(client):
    info = client.info
    assert info.architecture == "LlamaForCausalLM"
    assert info.max_model_len > 0 and info.num_kv_blocks > 0 and info.eos_token_ids
    assert info.device == "cpu" and info.attention_backend == cpu_kernels.expected_backend()


def test_greedy_request_runs_to_max_tokens(client):
    tokens, reason = _collect(client, _request(client, [1, 5, 9, 33], max_tokens=12, temperature=0.0, ignore_eos=True))
    assert len(tokens) == 12 and reason == FinishReason.LENGTH
    again, _ = _collect(client, _request(client, [1, 5, 9, 33], max_tokens=12, temperature=0.0, ignore_eos=True))
    assert again == tokens


def test_concurrent_greenlets_get_independent_outputs(client):
    prompts = [[1, 7 + i, 40 + 2 * i, 99] for i in range(8)]
    alone = [_collect(client, _request(client, p, max_tokens=10, temperature=0.0, ignore_eos=True))[0] for p in prompts]
    jobs = [
        gevent.spawn(_collect, client, _request(client, p, max_tokens=10, temperature=0.0, ignore_eos=True))
        for p in prompts
    ]
    gevent.joinall(jobs, timeout=60, raise_error=True)
    assert [job.value[0] for job in jobs] == alone


def test_closing_a_stream_aborts_the_engine_request(client):
    stream = client.submit(_request(client, [1, 2, 3], max_tokens=500, temperature=0.0, ignore_eos=True))
    first = next(iter(stream))
    assert first.new_token_ids
    stream.close()
    assert client.num_in_flight == 0


def test_request_that_cannot_fit_fails_alone(client):
    too_long = list(range(1, 5)) * 2000
    tokens, reason = _collect(client, _request(client, too_long, max_tokens=4))
    assert tokens == [] and reason == FinishReason.REJECTED
    ok, _ = _collect(client, _request(client, [1, 2], max_tokens=3, temperature=0.0, ignore_eos=True))
    assert len(ok) == 3


def test_engine_death_fails_waiting_requests_at_once():
    """The engine process killed: its end of the socket closes, and the client fails what is in flight then, not
    after the heartbeat timeout (10 s here)."""
    handle = start_engine()
    client = SocketEngineClient(handle.address)
    try:
        assert client.wait_ready(30)
        stream = client.submit(_request(client, [1, 2, 3], max_tokens=2000, temperature=0.0, ignore_eos=True))
        iterator = iter(stream)
        next(iterator)
        handle.process.kill()
        killed = time.monotonic()
        with pytest.raises(EngineDeadError, match="the engine process exited"), gevent.Timeout(5):
            list(iterator)  # drained until the engine's death ends it
        assert time.monotonic() - killed < 5 and not client.is_ready() and not client.is_alive()
    finally:
        client.close()
        handle.stop()


def test_a_stuck_engine_fails_waiting_requests_after_the_heartbeat_timeout():
    """An engine that is alive but sends nothing (stopped here): its socket stays open, the heartbeats' silence
    says it is gone."""
    handle = start_engine()
    client = SocketEngineClient(handle.address, heartbeat_timeout_s=2.0)
    try:
        assert client.wait_ready(30)
        stream = client.submit(_request(client, [1, 2, 3], max_tokens=2000, temperature=0.0, ignore_eos=True))
        iterator = iter(stream)
        next(iterator)
        handle.process.send_signal(signal.SIGSTOP)
        with pytest.raises(EngineDeadError, match="stopped responding"), gevent.Timeout(30):
            list(iterator)  # drained until the engine's death ends it
        assert not client.is_ready()
    finally:
        handle.process.send_signal(signal.SIGCONT)
        client.close()
        handle.stop()


@pytest.mark.parametrize("logprobs", [None, 2])
def test_outputs_that_queued_up_arrive_merged_in_order(client, logprobs):
    """A reader that falls behind gets the waiting outputs as one: same tokens, logprobs still one per token."""
    prompt, params = [1, 5, 9, 33], dict(max_tokens=10, temperature=0.0, ignore_eos=True, logprobs=logprobs)
    prompt_outputs = list(client.submit(_request(client, prompt, **params)))  # read as they come
    stream = client.submit(_request(client, prompt, **params))
    for _ in range(200):  # let the engine finish before reading anything
        gevent.sleep(0.05)
        if client.num_in_flight == 0:  # the reader has routed the last output
            break
    late_outputs = list(stream)
    assert len(late_outputs) == 1  # (read promptly, the same tokens came as several outputs, step by step)
    late = late_outputs[0]
    assert late.new_token_ids == [t for o in prompt_outputs for t in o.new_token_ids]
    assert late.finished and late.finish_reason == FinishReason.LENGTH
    assert late.num_prompt_tokens == len(prompt)
    if logprobs is None:
        assert late.new_logprobs is None
    else:
        assert [lp.token_id for lp in late.new_logprobs] == late.new_token_ids
        expected = [lp.logprob for o in prompt_outputs for lp in o.new_logprobs]
        assert [lp.logprob for lp in late.new_logprobs] == pytest.approx(expected, abs=1e-5)


def test_a_worker_that_was_busy_does_not_declare_the_engine_dead(engine):
    """A hub blocked past the heartbeat timeout (a long tokenization, say) finds heartbeats waiting: the
    in-flight request goes on instead of failing with EngineDeadError."""
    client = SocketEngineClient(engine.address, heartbeat_timeout_s=1.0)
    try:
        assert client.wait_ready(30)
        stream = client.submit(_request(client, [1, 5, 9, 33], max_tokens=40, temperature=0.0, ignore_eos=True))
        time.sleep(2.5)  # not gevent's: nothing in this worker runs, the engine keeps sending
        tokens = [t for output in stream for t in output.new_token_ids]
        assert len(tokens) == 40
    finally:
        client.close()


_DOOMED_WORKER = """
import sys, time, uuid
from model_handler.engine_protocol import EngineRequest
from model_handler.sampling_params import SamplingParams
from serve.engine_client import SocketEngineClient

client = SocketEngineClient(sys.argv[1])
assert client.wait_ready(30)
params = SamplingParams(max_tokens=2000, temperature=0.0, ignore_eos=True)
streams = [client.submit(EngineRequest(uuid.uuid4().hex, [1, 2, 3, 4 + i], params)) for i in range(8)]
for stream in streams:
    next(iter(stream))
print("generating", flush=True)
time.sleep(600)
"""


def test_the_requests_of_a_worker_that_died_are_aborted(engine):
    """A worker killed mid-generation (SIGKILL, as gunicorn does to one stuck past its timeout) leaves nobody to
    read its outputs: the engine sees its process is gone and frees the batch instead of generating 8 x 2000
    tokens for no one."""
    watcher = SocketEngineClient(engine.address)
    try:
        assert watcher.wait_ready(30)
        start_free = watcher.last_heartbeat.num_free_blocks
        doomed = subprocess.Popen(
            [sys.executable, "-c", _DOOMED_WORKER, engine.address], cwd=REPO_ROOT, stdout=subprocess.PIPE
        )
        try:
            assert doomed.stdout.readline().strip() == b"generating"
            gevent.sleep(1.2)  # two heartbeats: the watcher sees the busy engine
            assert watcher.last_heartbeat.num_running + watcher.last_heartbeat.num_waiting == 8
        finally:
            doomed.kill()
            doomed.wait()
        killed_at = time.monotonic()
        while watcher.last_heartbeat.num_running + watcher.last_heartbeat.num_waiting > 0:
            assert time.monotonic() - killed_at < 3.0, "the dead worker's requests are still generating"
            gevent.sleep(0.1)
        for _ in range(20):  # the next heartbeat after the abort shows the blocks back
            if watcher.last_heartbeat.num_free_blocks == start_free:
                break
            gevent.sleep(0.25)
        assert watcher.last_heartbeat.num_free_blocks == start_free
        assert "HTTP worker gone" in engine.log_path.read_text()
    finally:
        watcher.close()


def test_constrained_requests_cross_the_seam(client):
    """A constraint that compiles (in the engine, off its step loop) shapes the output; one that does not comes
    back REJECTED before any token, with what is wrong with it, for the HTTP side's 400."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(client.info.model_dir)
    regex = Constraint(ConstraintKind.REGEX, r"(yes|no), [a-z]{2,6}")
    outputs = list(client.submit(_request(client, [1, 5, 9, 33], max_tokens=30, temperature=0.0, constraint=regex)))
    token_ids = [t for output in outputs for t in output.new_token_ids]
    assert outputs[-1].finish_reason == FinishReason.EOS and token_ids[-1] in client.info.eos_token_ids
    assert re.fullmatch(regex.value, tokenizer.decode(token_ids[:-1]))
    bad = Constraint(ConstraintKind.JSON_SCHEMA, '{"type": "strin"}')
    [refused] = list(client.submit(_request(client, [1, 5, 9, 33], max_tokens=30, constraint=bad)))
    assert refused.finish_reason == FinishReason.REJECTED and refused.new_token_ids == []
    assert refused.failure_message == 'the JSON schema is invalid: Unsupported type "strin"'
    assert client.info.grammar_backend == "xgrammar 0.2.9"
