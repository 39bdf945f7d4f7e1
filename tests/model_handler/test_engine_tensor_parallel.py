"""Tensor parallelism in the engine: two gloo ranks on CPU give the single-rank engine's greedy tokens, the
engine process serves with SM_NUM_GPUS=2, and a killed worker rank makes it exit non-zero."""

from __future__ import annotations

import os
import pickle
import signal
import time

import psutil
import pytest
import zmq

from model_handler.engine_protocol import EngineRequest, Heartbeat, Hello, OutputBatch
from tests.live import start_engine
from tests.model_handler.engine_factories import create_engine, greedy, random_prompt, run_to_completion, tokens_of

# A small step budget, so the longer prompts are prefilled in chunks over several steps.
ENV = {"MAX_BATCH_PREFILL_TOKENS": "32", "MAX_BATCH_SIZE": "8"}
EXIT_WITHIN_S = 30.0


@pytest.fixture(scope="module")
def single_engine(test_model_dir):
    return create_engine(test_model_dir, **ENV)


@pytest.fixture(scope="module")
def tp_engine(test_model_dir):
    engine = create_engine(test_model_dir, SM_NUM_GPUS="2", **ENV)
    workers = engine.model_runner.workers.processes
    yield engine
    engine.model_runner.shutdown()
    assert [p.exitcode for p in workers] == [0], "a worker did not exit cleanly on the stop message"


def _generate(engine, requests: list[EngineRequest]) -> dict[str, list[int]]:
    for request in requests:
        engine.add_request(request)
    return {rid: tokens_of(outputs) for rid, outputs in run_to_completion(engine).items()}


def test_engine_is_rank_zero_of_two(tp_engine, single_engine):
    info = tp_engine.info()
    assert info.tensor_parallel_size == 2
    runner = tp_engine.model_runner
    assert runner.num_kv_heads == single_engine.model_runner.num_kv_heads // 2  # each rank caches its heads
    assert [p.is_alive() for p in runner.workers.processes] == [True]
    # The CPU budget is shared by the ranks: half the heads each, so as many blocks as one rank holds.
    assert info.num_kv_blocks == single_engine.info().num_kv_blocks


@pytest.mark.parametrize("prompt_len", [5, 31, 90])  # one step, one full budget, chunked over three steps
def test_prompt_alone_matches_single_rank(tp_engine, single_engine, prompt_len):
    requests = lambda: [greedy("alone", random_prompt(prompt_len, seed=prompt_len), 12)]  # noqa: E731
    single = _generate(single_engine, requests())
    assert _generate(tp_engine, requests()) == single
    assert len(single["alone"]) == 12 and len(set(single["alone"])) > 1


def test_mixed_batch_with_chunked_prefill_matches_single_rank(tp_engine, single_engine):
    """Decodes, whole prompts and prefill chunks share steps; a repeated prompt hits the prefix cache."""

    def run(engine) -> dict[str, list[int]]:
        for i, n in enumerate((7, 50, 3, 20)):
            engine.add_request(greedy(f"first-{i}", random_prompt(n, seed=100 + i), 16))
        outputs: dict[str, list[int]] = {}
        for _ in range(3):  # the first ones are decoding when the next arrive
            for out in engine.step():
                outputs.setdefault(out.request_id, []).extend(out.new_token_ids)
        engine.add_request(greedy("late-long", random_prompt(70, seed=200), 10))
        engine.add_request(greedy("late-repeat", random_prompt(50, seed=101), 8))
        for rid, outs in run_to_completion(engine).items():
            outputs.setdefault(rid, []).extend(tokens_of(outs))
        return outputs

    single = run(single_engine)
    assert run(tp_engine) == single
    assert len(single) == 6 and single["late-repeat"] == single["first-1"][:8]


# ---- the engine process -----------------------------------------------------------------------------


def _worker_pids(pid: int) -> list[int]:
    """The engine's spawned rank processes (not multiprocessing's resource tracker)."""
    return [c.pid for c in psutil.Process(pid).children() if any("spawn_main" in arg for arg in c.cmdline())]


def _serve_one(address: str, request: EngineRequest, timeout_s: float = 60.0) -> list[int]:
    """Send one request over the engine's socket, as the HTTP side's client does; its tokens."""
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    try:
        sock.send(pickle.dumps(Hello(worker_pid=os.getpid())))
        sock.send(pickle.dumps(request))
        tokens: list[int] = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not sock.poll(200):
                continue
            message = pickle.loads(sock.recv())
            if isinstance(message, Heartbeat):
                assert message.error is None, message.error
                continue
            assert isinstance(message, OutputBatch)
            for output in message.outputs:
                assert output.request_id == request.request_id, output
                assert output.finish_reason is None or not output.finish_reason.is_failure, output
                tokens += output.new_token_ids
                if output.finished:
                    return tokens
        raise TimeoutError("the engine process did not finish the request")
    finally:
        sock.close(linger=0)
        context.term()


def test_engine_process_serves_with_two_ranks_and_dies_with_a_worker(test_model_dir, single_engine):
    handle = start_engine(env={"SM_NUM_GPUS": "2", "HF_MODEL_ID": str(test_model_dir), **ENV})
    try:
        prompt = random_prompt(40, seed=7)
        tokens = _serve_one(handle.address, greedy("served", prompt, 10))
        assert tokens == _generate(single_engine, [greedy("served", prompt, 10)])["served"]

        [worker] = _worker_pids(handle.process.pid)
        os.kill(worker, signal.SIGKILL)
        code = handle.process.wait(timeout=EXIT_WITHIN_S)
        assert code != 0, handle.logs()
        assert "tensor-parallel worker died" in handle.logs()
    finally:
        handle.stop()


# ---- configuration ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["SM_NUM_GPUS", "NUM_SHARD"])
def test_more_ranks_than_gpus_is_a_config_error(test_model_dir, monkeypatch, name):
    import torch

    from model_handler.config import EngineConfig

    # A two-GPU machine, as torch would report it (this one has none).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    environ = {"HF_MODEL_ID": str(test_model_dir), "DTYPE": "float16", name: "4"}
    with pytest.raises(ValueError, match=f"{name}=4 .* 2 CUDA device"):
        EngineConfig.from_env(environ, device="cuda")
    assert EngineConfig.from_env({**environ, name: "2"}, device="cuda").tensor_parallel_size == 2


def test_heads_that_do_not_split_fail_before_any_worker_starts(test_model_dir):
    with pytest.raises(ValueError, match="SM_NUM_GPUS/NUM_SHARD=3 cannot shard this model: its 4 attention heads"):
        create_engine(test_model_dir, SM_NUM_GPUS="3")
