"""The fused Triton MoE (interpreted on CPU) against the torch experts loop, and its expert-major layout."""

from __future__ import annotations

import pytest
import torch

from model_handler.kernels import moe_reference, triton_moe
from model_handler.kernels.triton_moe import MoeTileConfig

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
# Tiles smaller than the test's dimensions: several column tiles and reduction steps, ragged last ones.
SMALL_TILES = MoeTileConfig(block_m=16, block_n=16, block_k=16, num_warps=4, num_stages=2, dot_fp32=True)


def random(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def expert_weights(num_experts: int, hidden: int, inter: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    w13 = random(num_experts, 2 * inter, hidden, seed=1, scale=hidden**-0.5).to(dtype)
    w2 = random(num_experts, hidden, inter, seed=2, scale=inter**-0.5).to(dtype)
    return w13, w2


def skewed_routing(num_tokens: int, num_experts: int, top_k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing from logits biased hard towards expert 0 and away from the last expert: uneven loads, one
    expert with many tokens, the last with none."""
    logits = random(num_tokens, num_experts, seed=seed)
    logits[:, 0] += 3.0
    logits[:, -1] -= 100.0
    return moe_reference.route(logits, top_k, renormalize=top_k > 1)


def check_against_reference(
    num_tokens: int, top_k: int, dtype: torch.dtype, cfg: MoeTileConfig | None, num_experts: int = 6
) -> None:
    hidden, inter = 64, 40  # 40: the last column tile of the gate/up GEMM and the down GEMM's K are ragged
    w13, w2 = expert_weights(num_experts, hidden, inter, dtype)
    x = random(num_tokens, hidden, seed=3).to(dtype)
    weights, ids = skewed_routing(num_tokens, num_experts, top_k, seed=4)
    counts = torch.bincount(ids.flatten(), minlength=num_experts)
    assert counts[-1] == 0 and counts[0] >= num_tokens // 2  # the load really is uneven
    out = triton_moe.fused_experts(x, w13, w2, weights, ids, cfg)
    expected = moe_reference.experts(x.float(), w13.float(), w2.float(), weights, ids)
    assert out.shape == (num_tokens, hidden) and out.dtype == dtype
    torch.testing.assert_close(out.float(), expected, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("top_k", [1, 2])
def test_fused_experts_match_the_torch_loop(dtype, top_k):
    check_against_reference(37, top_k, dtype, SMALL_TILES)


@pytest.mark.parametrize("num_tokens", [1, 3])
def test_decode_sized_batches_with_the_default_tiles(num_tokens):
    """A decode step: most experts get nothing, the chosen ones a row or two in a 16-row block."""
    check_against_reference(num_tokens, 2, torch.float32, None)


def test_a_block_spanning_experts_runs_is_never_formed():
    """More pairs on one expert than one block holds: its run spans blocks, the next expert starts a new one."""
    check_against_reference(40, 2, torch.float32, MoeTileConfig(16, 32, 32, 4, 2, True), num_experts=3)


def test_layout_groups_every_pair_once_in_expert_runs():
    ids = torch.tensor([[2, 0], [2, 3], [0, 2], [2, 0], [3, 2]], dtype=torch.int64)  # expert 1: no pairs
    block_m = 4
    layout = triton_moe.group_by_expert(ids, num_experts=5, block_m=block_m)
    num_pairs = ids.numel()
    rows = layout.sorted_pair_ids.tolist()
    used = int(layout.padded_ends[-1])
    # expert 0: 3 pairs -> 4 rows, expert 2: 5 pairs -> 8 rows, expert 3: 2 pairs -> 4 rows
    assert layout.padded_ends.tolist() == [4, 4, 12, 16, 16]
    assert used == 16 and len(rows) == triton_moe.max_layout_rows(num_pairs, 5, block_m) >= used
    assert sorted(r for r in rows if r < num_pairs) == list(range(num_pairs))  # every pair exactly once
    assert all(r == num_pairs for r in rows[used:])  # the worst-case tail is padding
    flat = ids.flatten().tolist()
    for block, expert in enumerate(layout.block_experts[: used // block_m].tolist()):
        members = [r for r in rows[block * block_m : (block + 1) * block_m] if r < num_pairs]
        assert members and all(flat[r] == expert for r in members)  # one expert per block, no empty block
        assert members == sorted(members)  # pair order kept within a run
    assert layout.block_experts[: used // block_m].tolist() == [0, 2, 2, 3]


def test_no_tokens_gives_an_empty_result():
    w13, w2 = expert_weights(4, 32, 16, torch.float32)
    empty = torch.empty(0, 2)
    out = triton_moe.fused_experts(torch.empty(0, 32), w13, w2, empty, empty.long())
    assert out.shape == (0, 32)


def test_tile_config_depends_on_shapes_only():
    decode = triton_moe.tile_config(2, 8, torch.bfloat16, on_gpu=True)
    prefill = triton_moe.tile_config(8192 * 2, 8, torch.bfloat16, on_gpu=True)
    assert decode.block_m == 16 and prefill.block_m == 64 and not prefill.dot_fp32
    assert triton_moe.tile_config(2, 8, torch.bfloat16, on_gpu=False).dot_fp32  # the interpreter's bf16 dot
    assert triton_moe.tile_config(2, 8, torch.float32, on_gpu=True).dot_fp32  # fp32: ieee, no tf32


def test_mismatched_inputs_are_refused():
    w13, w2 = expert_weights(4, 32, 16, torch.float32)
    weights, ids = torch.ones(3, 2), torch.zeros(3, 2, dtype=torch.int64)
    with pytest.raises(ValueError, match="expert weights do not fit"):
        triton_moe.fused_experts(torch.randn(3, 48), w13, w2, weights, ids)
    with pytest.raises(ValueError, match="share a dtype"):
        triton_moe.fused_experts(torch.randn(3, 32, dtype=torch.bfloat16), w13, w2, weights, ids)
    with pytest.raises(ValueError, match="topk_ids"):
        triton_moe.fused_experts(torch.randn(3, 32), w13, w2, weights[:, :1], ids)


def test_route_renormalises_only_when_asked():
    logits = random(5, 8, seed=0)
    weights, ids = moe_reference.route(logits, 2, renormalize=True)
    torch.testing.assert_close(weights.sum(-1), torch.ones(5))
    raw, same_ids = moe_reference.route(logits, 2, renormalize=False)
    assert torch.equal(ids, same_ids) and bool((raw.sum(-1) < 1).all())
    torch.testing.assert_close(raw, torch.softmax(logits, -1).gather(1, ids))
    assert weights.dtype == raw.dtype == torch.float32


# ---- on a GPU -----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [1, 32, 512])
def test_mixtral_shapes_in_bf16_on_gpu(num_tokens):
    hidden, inter, num_experts = 4096, 14336, 8
    torch.manual_seed(0)
    w13 = (torch.randn(num_experts, 2 * inter, hidden, device="cuda") * hidden**-0.5).bfloat16()
    w2 = (torch.randn(num_experts, hidden, inter, device="cuda") * inter**-0.5).bfloat16()
    x = torch.randn(num_tokens, hidden, device="cuda").bfloat16()
    weights, ids = moe_reference.route(torch.randn(num_tokens, num_experts, device="cuda"), 2, True)
    out = triton_moe.fused_experts(x, w13, w2, weights, ids)
    expected = moe_reference.experts(x.float(), w13.float(), w2.float(), weights, ids)
    assert (out.float() - expected).abs().max().item() < 3e-2 * expected.abs().max().item()


@pytest.mark.gpu
def test_replays_in_a_cuda_graph_with_new_routing():
    """The layout and both GEMMs are captured once and replayed with other tokens and other experts."""
    hidden, inter, num_experts, num_tokens = 256, 512, 8, 16
    w13, w2 = (w.cuda() for w in expert_weights(num_experts, hidden, inter, torch.bfloat16))
    x = torch.zeros(num_tokens, hidden, dtype=torch.bfloat16, device="cuda")
    logits = torch.zeros(num_tokens, num_experts, device="cuda")
    out = torch.empty_like(x)

    def step():
        weights, ids = moe_reference.route(logits, 2, True)
        out.copy_(triton_moe.fused_experts(x, w13, w2, weights, ids))

    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for seed in (1, 2):
        x.copy_(random(num_tokens, hidden, seed=seed).bfloat16())
        logits.copy_(random(num_tokens, num_experts, seed=seed + 10))
        graph.replay()
        weights, ids = moe_reference.route(logits, 2, True)
        expected = moe_reference.experts(x.float(), w13.float(), w2.float(), weights, ids)
        torch.testing.assert_close(out.float(), expected, atol=3e-2, rtol=3e-2)
