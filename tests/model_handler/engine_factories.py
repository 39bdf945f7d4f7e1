"""Small factories for the engine-core tests: requests, sequences and schedulers without a model."""

from __future__ import annotations

import itertools
from pathlib import Path

from model_handler.block_manager import BlockManager
from model_handler.engine_protocol import EngineRequest
from model_handler.sampling_params import SamplingParams
from model_handler.scheduler import Scheduler, SchedulerOutput
from model_handler.sequence import Sequence

EOS = 1
_ids = itertools.count()


def create_requests(
    num_requests: int,
    prompt_len: int = 8,
    max_tokens: int = 4,
    first_token: int = 10,
    **params,
) -> list[EngineRequest]:
    """Requests with distinct prompts (so no prefix is shared unless a test wants it)."""
    requests = []
    for _ in range(num_requests):
        n = next(_ids)
        prompt = [first_token + (n * 997 + i) % 3000 for i in range(prompt_len)]
        sampling = SamplingParams(max_tokens=max_tokens, **params)
        requests.append(EngineRequest(f"req-{n}", prompt, sampling))
    return requests


def create_sequence(prompt: list[int], eos_token_ids: tuple[int, ...] = (EOS,), **params) -> Sequence:
    request = EngineRequest(f"seq-{next(_ids)}", list(prompt), SamplingParams(**params))
    return Sequence(request, eos_token_ids)


def create_scheduler(
    num_blocks: int = 64,
    block_size: int = 4,
    max_num_seqs: int = 16,
    max_num_prefill_tokens: int = 64,
    max_model_len: int = 256,
    enable_prefix_caching: bool = True,
) -> Scheduler:
    block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching)
    return Scheduler(block_manager, max_num_seqs, max_num_prefill_tokens, max_model_len, eos_token_ids=(EOS,))


def add_requests(scheduler: Scheduler, requests: list[EngineRequest]) -> list[Sequence]:
    seqs = [Sequence(r, (EOS,)) for r in requests]
    for seq in seqs:
        scheduler.add(seq)
    return seqs


def run_step(scheduler: Scheduler, token_id: int = 7) -> tuple[SchedulerOutput, list[Sequence]]:
    """One schedule + update round, as if the model sampled `token_id` for every sampling sequence."""
    out = scheduler.schedule()
    num_sampling = sum(entry.samples for entry in out.scheduled)
    return out, scheduler.update_from_output(out, [token_id] * num_sampling)


def num_new_tokens(out: SchedulerOutput) -> dict[str, int]:
    return {entry.seq.request_id: entry.num_new_tokens for entry in out.scheduled}


# ---- the real engine on a small model folder ---------------------------------------------------------


def build_test_model(out_dir: Path) -> Path:
    """A model folder smaller than the embedded one (quick under the Triton interpreter), built the same way.

    init_std 0.15 (~1.6/sqrt(hidden), as the embedded model's) gives distinct greedy tokens at every step, so
    position or KV-cache bugs change the text instead of hiding behind one repeated token.
    """
    from model_handler.tiny_model import build_tiny_model

    return build_tiny_model(
        out_dir,
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        max_position_embeddings=512,
        init_std=0.15,
    )


def create_engine(model_dir, device: str = "cpu", **env: str):
    """An Engine configured through from_env, like the engine process does (small KV budget)."""
    from model_handler.config import EngineConfig
    from model_handler.engine import Engine

    environ = {
        "HF_MODEL_ID": str(model_dir),
        "KV_CACHE_CPU_BYTES": "4MiB",
        "KV_CACHE_BLOCK_SIZE": "8",
        "DTYPE": "float32",  # transformers' fp32 is the oracle (auto picks bf16 on CPUs with native bf16)
        **env,
    }
    return Engine(EngineConfig.from_env(environ, device=device))


def wait_until_ready(engine, timeout_s: float = 60.0) -> None:
    """Wait while the only unfinished requests wait for their grammar to compile (the engine server sleeps)."""
    import time

    deadline = time.monotonic() + timeout_s
    while not engine.has_ready_requests():
        if time.monotonic() > deadline:
            raise AssertionError("no request became ready to step")
        time.sleep(0.001)


def run_to_completion(engine, max_steps: int = 10_000) -> dict[str, list]:
    """Step until idle; every request's outputs, in order."""
    outputs: dict[str, list] = {}
    for _ in range(max_steps):
        if not engine.has_unfinished_requests():
            return outputs
        wait_until_ready(engine)
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
    raise AssertionError("engine did not finish")


def tokens_of(outputs: list) -> list[int]:
    return [t for out in outputs for t in out.new_token_ids]


def greedy(request_id: str, prompt: list[int], num_tokens: int, **params):
    """A greedy request that generates exactly `num_tokens` (EOS masked until then, as HF's min_new_tokens)."""
    sampling = SamplingParams(max_tokens=num_tokens, min_tokens=num_tokens, temperature=0.0, **params)
    return EngineRequest(request_id, list(prompt), sampling)


def random_prompt(length: int, seed: int, vocab_size: int = 512) -> list[int]:
    import random

    rng = random.Random(seed)
    return [rng.randrange(4, vocab_size) for _ in range(length)]


def hf_greedy(hf_model, prompt: list[int], num_tokens: int, **generate_kwargs) -> list[int]:
    """transformers' own greedy continuation, unpadded, with EOS masked for `num_tokens` steps."""
    import torch

    with torch.no_grad():
        out = hf_model.generate(
            torch.tensor([prompt]),
            do_sample=False,
            max_new_tokens=num_tokens,
            min_new_tokens=num_tokens,
            **generate_kwargs,
        )
    return out[0, len(prompt) :].tolist()
