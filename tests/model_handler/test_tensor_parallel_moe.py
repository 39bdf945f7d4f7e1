"""Tensor parallelism of the MoE families: two gloo ranks on CPU, each with its slice of every expert (and of
the shared expert), give the single-rank model's logits; experts that cannot be split are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from model_handler.kernels import TorchReferenceBackend
from model_handler.model_loader import load_model
from tests.model_handler.model_factories import save_random_model
from tests.model_handler.moe_factories import MOE_FAMILIES, moe_config
from tests.model_handler.test_tensor_parallel import TP_SIZE, _rank_main, run_steps


def load_single(model_dir: str):
    return load_model(
        model_dir, dtype=torch.float32, device=torch.device("cpu"), attention_backend=TorchReferenceBackend()
    )


def test_two_ranks_match_single_rank(tmp_path, monkeypatch):
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    model_dirs = []
    for family in MOE_FAMILIES:
        save_random_model(moe_config(family, max_position_embeddings=128), tmp_path / family)
        model_dirs.append(str(tmp_path / family))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    mp.spawn(_rank_main, args=(model_dirs, str(tmp_path / "init"), str(out_dir)), nprocs=TP_SIZE, join=True)

    for name in model_dirs:
        single = load_single(name)
        expected = run_steps(single)
        for rank in range(TP_SIZE):
            result = torch.load(out_dir / f"{Path(name).name}-rank{rank}.pt")
            assert len(result["logits"]) == len(expected)
            for got, want in zip(result["logits"], expected):
                assert got.shape == want.shape == (want.shape[0], single.config.vocab_size)
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_each_rank_holds_its_slice_of_every_expert(tmp_path):
    save_random_model(moe_config("qwen2_moe"), tmp_path)
    whole = load_single(str(tmp_path)).model.layers[0].mlp
    for rank in range(TP_SIZE):
        model = load_model(
            tmp_path,
            dtype=torch.float32,
            device=torch.device("cpu"),
            attention_backend=TorchReferenceBackend(),
            tp_rank=rank,
            tp_size=TP_SIZE,
        )
        block = model.model.layers[0].mlp
        inter = whole.experts.intermediate_size // TP_SIZE  # 16 of 32
        rows = slice(rank * inter, (rank + 1) * inter)
        gate, up = whole.experts.w13_weight[:, : 2 * inter], whole.experts.w13_weight[:, 2 * inter :]
        assert block.experts.w13_weight.shape == (4, 2 * inter, 64)
        torch.testing.assert_close(block.experts.w13_weight, torch.cat([gate[:, rows], up[:, rows]], 1), atol=0, rtol=0)
        torch.testing.assert_close(block.experts.w2_weight, whole.experts.w2_weight[:, :, rows], atol=0, rtol=0)
        assert block.shared_expert.down_proj.weight.shape == (64, 24)  # the shared expert is split too
        torch.testing.assert_close(block.gate.weight, whole.gate.weight, atol=0, rtol=0)  # the router is whole


def test_experts_that_do_not_split_are_refused(tmp_path):
    save_random_model(moe_config("qwen3_moe", moe_intermediate_size=33), tmp_path)
    with pytest.raises(ValueError, match=r"expert intermediate size \(33\) is not divisible"):
        load_model(
            tmp_path,
            dtype=torch.float32,
            device=torch.device("cpu"),
            attention_backend=TorchReferenceBackend(),
            tp_rank=0,
            tp_size=2,
        )
