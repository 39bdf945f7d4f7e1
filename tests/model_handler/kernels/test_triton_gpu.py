"""Compiled-kernel checks that need CUDA: native bf16 dots and CUDA-graph capture (skipped on CPU)."""

from __future__ import annotations

import pytest
import torch

from model_handler.kernels import reference
from model_handler.kernels.triton_attention import paged_attention

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
SCALE = 128**-0.5


def fp32_oracle(batch):
    return reference.paged_attention(
        batch.query.float(),
        batch.k_cache.float(),
        batch.v_cache.float(),
        batch.block_tables,
        batch.seq_lens,
        batch.query_start_loc,
        SCALE,
    )


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
def test_llama_shapes_mixed_batch(paged_batch, dtype, tol):
    q_lens = [1] * 12 + [300, 77]
    seq_lens = [1, 16, 17, 500, 1023, 1024, 1025, 2000, 3000, 4000, 64, 4096, 300, 1077]
    batch = paged_batch(q_lens, seq_lens, num_heads=32, num_kv_heads=8, head_dim=128, dtype=dtype)
    for num_splits in (1, 16):
        out = torch.full_like(batch.query, float("nan"))
        paged_attention(
            batch.query,
            batch.k_cache,
            batch.v_cache,
            batch.block_tables,
            batch.seq_lens,
            batch.query_start_loc,
            SCALE,
            batch.max_query_len,
            out,
            num_splits=num_splits,
        )
        assert (out.float() - fp32_oracle(batch)).abs().max().item() < tol


def test_gemma2_9b_shapes_with_windows_and_soft_caps(paged_batch):
    """Gemma-2-9B's attention (16 heads, 8 kv heads, head dim 256, scale 256 ** -0.5, logits capped at 50) with its
    4096 window on contexts around it, prompts and decodes, the context split across programs and not."""
    q_lens = [1] * 6 + [300, 77]
    seq_lens = [100, 4095, 4096, 4097, 5000, 6000, 4500, 377]
    batch = paged_batch(q_lens, seq_lens, num_heads=16, num_kv_heads=8, head_dim=256, dtype=torch.bfloat16)
    options = dict(sliding_window=4096, softcap=50.0)
    expected = reference.paged_attention(
        batch.query.float(),
        batch.k_cache.float(),
        batch.v_cache.float(),
        batch.block_tables,
        batch.seq_lens,
        batch.query_start_loc,
        256**-0.5,
        **options,
    )
    for num_splits in (1, 16):
        out = torch.full_like(batch.query, float("nan"))
        paged_attention(
            batch.query,
            batch.k_cache,
            batch.v_cache,
            batch.block_tables,
            batch.seq_lens,
            batch.query_start_loc,
            256**-0.5,
            batch.max_query_len,
            out,
            num_splits=num_splits,
            **options,
        )
        assert (out.float() - expected).abs().max().item() < 3e-2


def test_decode_replays_in_a_cuda_graph_with_new_lengths(paged_batch):
    batch = paged_batch([1] * 8, [2048] * 8, num_heads=32, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16)
    out = torch.empty_like(batch.query)

    def step():
        paged_attention(
            batch.query,
            batch.k_cache,
            batch.v_cache,
            batch.block_tables,
            batch.seq_lens,
            batch.query_start_loc,
            SCALE,
            1,
            out,
        )

    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    batch.seq_lens.copy_(torch.tensor([0, 1, 15, 16, 17, 999, 2047, 2048], dtype=torch.int32))
    graph.replay()
    expected = fp32_oracle(batch)
    assert torch.isfinite(out).all()
    assert (out[1:].float() - expected[1:]).abs().max().item() < 3e-2
