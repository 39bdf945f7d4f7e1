"""Tensor-parallel ranks 1..N-1: `TPWorkers`, rank 0's handle that starts them, watches them and stops them
(their entry point, `model_runner.run_tp_rank`, is passed in).

A worker that dies (killed, out of memory, a failed load) takes the engine process down with exit code 1,
and so does a step that fails on rank 0: the launcher then stops the container and SageMaker replaces it,
where ranks out of step would hang in a collective forever. A worker whose engine process dies exits too.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import wait
from typing import NoReturn

import torch.multiprocessing as mp

from model_handler.config import EngineConfig
from model_handler.model_config import ModelConfig
from model_handler.step_broadcast import StepBroadcast, new_init_method

logger = logging.getLogger(__name__)

WORKER_DIED_EXIT_CODE = 1
STOP_TIMEOUT_S = 10.0
DEATH_GRACE_S = 2.0
_PARENT_POLL_S = 0.5


def check_shardable(model_config: ModelConfig, tp_size: int) -> None:
    """ValueError before any process starts when the model's heads cannot be split over `tp_size` ranks."""
    heads, kv_heads = model_config.num_heads, model_config.num_kv_heads
    if heads % tp_size or (kv_heads % tp_size and tp_size % kv_heads):
        raise ValueError(
            f"SM_NUM_GPUS/NUM_SHARD={tp_size} cannot shard this model: its {heads} attention heads and "
            f"{kv_heads} key/value heads must split evenly over the ranks (use a divisor of {heads})"
        )


class TPWorkers:
    """Ranks 1..tp_size-1 as spawned processes, and a thread that fails the engine loudly if one dies."""

    def __init__(self, config: EngineConfig, tp_size: int, rank_main: Callable[..., None]) -> None:
        """Start `rank_main(rank, tp_size, config, init_method, parent_pid)` in a process per rank 1..N-1."""
        self.tp_size = tp_size
        self.init_method, self.rendezvous_dir = new_init_method()
        self._stopping = threading.Event()
        context = mp.get_context("spawn")
        self.processes = [
            context.Process(
                target=rank_main,
                args=(rank, tp_size, config, self.init_method, os.getpid()),
                name=f"tp-rank-{rank}",
                daemon=True,  # also ended by multiprocessing when the engine exits normally
            )
            for rank in range(1, tp_size)
        ]
        for process in self.processes:
            process.start()
        logger.info("started tensor-parallel workers", extra={"pids": [p.pid for p in self.processes]})
        self._watchdog = threading.Thread(target=self._watch, name="tp-watchdog", daemon=True)
        self._watchdog.start()

    def _watch(self) -> None:
        pending = {process.sentinel: process for process in self.processes}
        while pending:
            for sentinel in wait(list(pending)):
                process = pending.pop(sentinel)
                # A start-up error that every rank hits (a KV budget too small) also fails rank 0, which then
                # reports it and stops us: give it that moment before calling this death unexpected.
                if self._stopping.wait(DEATH_GRACE_S):
                    continue
                process.join()
                # The main thread may be blocked in a collective that will never complete: exit from here.
                self.fail("tensor-parallel worker died", worker=process.name, exit_code=process.exitcode)

    def fail(self, reason: str, exc_info: bool = False, **extra: object) -> NoReturn:
        """End the engine process with exit code 1 (after the workers): the ranks are out of step for good."""
        self._stopping.set()
        logger.critical(f"{reason}; stopping the engine", exc_info=exc_info, extra=extra)
        self._kill()
        shutil.rmtree(self.rendezvous_dir, ignore_errors=True)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(WORKER_DIED_EXIT_CODE)

    def stop(self, broadcast: StepBroadcast) -> None:
        """Send the stop message, wait for the workers to exit (killing any that do not), leave the group."""
        self._stopping.set()
        try:
            broadcast.send_stop()
            deadline = time.monotonic() + STOP_TIMEOUT_S
            for process in self.processes:
                process.join(timeout=max(0.0, deadline - time.monotonic()))
        finally:
            self._kill()
            broadcast.close(self.rendezvous_dir)

    def abort(self, broadcast: StepBroadcast | None) -> None:
        """Start-up failed on rank 0: the workers may sit in any collective, so end them without a message."""
        self._stopping.set()
        self._kill()
        if broadcast is not None:
            broadcast.close()
        shutil.rmtree(self.rendezvous_dir, ignore_errors=True)

    def _kill(self) -> None:
        for process in self.processes:
            if process.is_alive():
                process.kill()
        for process in self.processes:
            process.join(timeout=STOP_TIMEOUT_S)


def exit_with_parent(parent_pid: int) -> None:
    """A worker outlives its engine only by a moment: a killed engine never sends the stop message."""
    while True:
        time.sleep(_PARENT_POLL_S)
        if os.getppid() != parent_pid:
            os._exit(WORKER_DIED_EXIT_CODE)
