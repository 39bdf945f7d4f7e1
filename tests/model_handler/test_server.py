"""The engine server's step loop around a real engine and a real socket: it sleeps while the only requests left
wait for their grammar to compile, and the compile's end wakes it."""

from __future__ import annotations

import pickle
import threading
import time

import pytest
import zmq

from model_handler import server as server_module
from model_handler.constraints import Constraint, ConstraintKind
from model_handler.engine_protocol import EngineRequest, FinishReason, Heartbeat, Hello, OutputBatch
from model_handler.sampling_params import SamplingParams
from model_handler.server import EngineIO, EngineServer, Wakeup
from tests.model_handler.engine_factories import create_engine


@pytest.fixture()
def engine(test_model_dir):
    return create_engine(test_model_dir)


def test_the_loop_sleeps_through_a_compile_and_wakes_when_it_ends(engine, tmp_path, monkeypatch):
    # Heartbeats (and the inbox wait) every 30 s: only the compile's Wakeup can get the request going in time.
    monkeypatch.setattr(server_module, "HEARTBEAT_INTERVAL_S", 30.0)
    release = threading.Event()
    compile_now = engine.grammar_compiler._compile
    monkeypatch.setattr(engine.grammar_compiler, "_compile", lambda c: release.wait(30) and compile_now(c))
    num_steps = 0
    step = engine.step

    def counted_step():
        nonlocal num_steps
        num_steps += 1
        return step()

    monkeypatch.setattr(engine, "step", counted_step)
    context = zmq.Context()
    io = EngineIO(context, f"ipc://{tmp_path}/engine.sock")
    io.start()
    server = EngineServer(engine, io)
    loop = threading.Thread(target=server.run, daemon=True)
    loop.start()
    worker = context.socket(zmq.DEALER)
    worker.setsockopt(zmq.LINGER, 0)
    worker.connect(f"ipc://{tmp_path}/engine.sock")
    try:
        worker.send(pickle.dumps(Hello(worker_pid=0)))
        assert isinstance(pickle.loads(worker.recv()), Heartbeat)
        constraint = Constraint(ConstraintKind.REGEX, "(on|off) [0-9]")
        params = SamplingParams(max_tokens=10, temperature=0.0, constraint=constraint)
        worker.send(pickle.dumps(EngineRequest("r", [5, 6, 7], params)))
        while engine.stats()[1] == 0:  # until the engine holds it, waiting for its grammar
            time.sleep(0.01)
        time.sleep(0.5)  # a loop that spun would step thousands of times here
        assert num_steps <= 2
        release.set()
        token_ids, finish = [], None
        while finish is None:
            assert worker.poll(10_000), "the finished compile did not wake the step loop"
            for output in _outputs(worker):
                token_ids += output.new_token_ids
                finish = output.finish_reason
        assert finish is FinishReason.EOS and token_ids
    finally:
        server.stop()
        io.inbox.put((b"", Wakeup()))  # out of its 30 s wait
        loop.join(5)
        io.stop()  # the I/O thread may be in a 30 s poll: a message wakes it to see the stop
        worker.send(pickle.dumps(Hello(worker_pid=0)))
        for thread in threading.enumerate():
            if thread.name == "engine-io":
                thread.join(5)
        worker.close()
        context.destroy(linger=0)  # the server keeps its outbox socket open for its whole life
    assert not loop.is_alive()


def _outputs(worker: zmq.Socket) -> list:
    """The outputs of the next OutputBatch on the socket (heartbeats are skipped)."""
    message = pickle.loads(worker.recv())
    return message.outputs if isinstance(message, OutputBatch) else []
