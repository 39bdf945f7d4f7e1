"""Tensor parallelism: two gloo ranks on CPU, each with its shard, give the single-rank model's logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import LlamaConfig, Qwen3Config

from model_handler.kernels import TorchReferenceBackend
from model_handler.model_loader import load_model
from tests.model_handler.model_factories import PagedBatches, make_kv_caches, save_random_model

TP_SIZE = 2
BLOCK_SIZE, NUM_BLOCKS = 4, 32


def tp_configs() -> dict[str, object]:
    common = dict(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        eos_token_id=2,
        bos_token_id=1,
    )
    return {
        # odd vocab (padded shard), one kv head (replicated on both ranks), biases after the all-reduce
        "llama": LlamaConfig(**common, vocab_size=97, num_key_value_heads=1, attention_bias=True, mlp_bias=True),
        # two kv heads (one per rank), per-head q/k norm, tied embeddings through the vocab-parallel head
        "qwen3": Qwen3Config(**common, vocab_size=96, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True),
    }


def run_steps(model) -> list[torch.Tensor]:
    """A mixed prefill, a step with one chunk and decodes, and a decode step; the logits of every new token."""
    torch.manual_seed(0)
    vocab = model.config.vocab_size
    prompts = [torch.randint(0, vocab, (n,)).tolist() for n in (6, 3, 11)]
    steps = [prompts, [[5], [6, 7, 8], [9]], [[10], [11], [12]]]
    batches = PagedBatches(BLOCK_SIZE, NUM_BLOCKS)
    caches = make_kv_caches(
        model.config.num_layers, NUM_BLOCKS, BLOCK_SIZE, model.num_kv_heads_per_rank, model.config.head_dim
    )
    logits = []
    with torch.inference_mode():
        for new_tokens in steps:
            input_ids, positions, metadata = batches.step(new_tokens)
            logits.append(model.compute_logits(model(input_ids, positions, caches, metadata)))
    return logits


def _rank_main(rank: int, model_dirs: list[str], init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=TP_SIZE)
    try:
        for name in model_dirs:
            model = load_model(
                name,
                dtype=torch.float32,
                device=torch.device("cpu"),
                attention_backend=TorchReferenceBackend(),
                tp_rank=rank,
                tp_size=TP_SIZE,
            )
            torch.save(
                {"logits": run_steps(model), "kv_heads": model.num_kv_heads_per_rank},
                Path(out_dir) / f"{Path(name).name}-rank{rank}.pt",
            )
    finally:
        torch.distributed.destroy_process_group()


def test_two_ranks_match_single_rank(tmp_path, monkeypatch):
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    model_dirs = []
    for name, config in tp_configs().items():
        save_random_model(config, tmp_path / name)
        model_dirs.append(str(tmp_path / name))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    mp.spawn(_rank_main, args=(model_dirs, str(tmp_path / "init"), str(out_dir)), nprocs=TP_SIZE, join=True)

    for name in model_dirs:
        single = load_model(
            name, dtype=torch.float32, device=torch.device("cpu"), attention_backend=TorchReferenceBackend()
        )
        expected = run_steps(single)
        for rank in range(TP_SIZE):
            result = torch.load(out_dir / f"{Path(name).name}-rank{rank}.pt")
            assert result["kv_heads"] == max(1, single.config.num_kv_heads // TP_SIZE)
            assert len(result["logits"]) == len(expected)
            for got, want in zip(result["logits"], expected):
                assert got.shape == want.shape == (want.shape[0], single.config.vocab_size)
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_sharding_rejects_heads_that_do_not_divide(tmp_path):
    config = LlamaConfig(
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=3,
        num_key_value_heads=3,
        vocab_size=64,
    )
    save_random_model(config, tmp_path)
    with pytest.raises(ValueError, match="number of attention heads"):
        load_model(
            tmp_path,
            dtype=torch.float32,
            device=torch.device("cpu"),
            attention_backend=TorchReferenceBackend(),
            tp_rank=0,
            tp_size=2,
        )


def test_tp_rank_out_of_range(tmp_path):
    with pytest.raises(ValueError, match="tp_rank"):
        load_model(
            tmp_path,
            dtype=torch.float32,
            device=torch.device("cpu"),
            attention_backend=TorchReferenceBackend(),
            tp_rank=2,
            tp_size=2,
        )
