"""The C++ CPU prefill kernel (prompts and prompt chunks over cached prefixes), against plain SDPA on unpaged
keys and values, directly and through the CPU backend."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest
import torch

from model_handler.kernels import cpu_build, cpu_native, cpu_prebuilt
from model_handler.kernels.cpu_backend import CpuBackend
from tests import cpu_kernels
from tests.model_handler.kernels.test_reference import SCALE, drop_blocks_before_windows, sdpa_per_sequence

# Justified skip: as in test_cpu_backend.py (a GPU machine, or no C++ compiler at all).
pytestmark = pytest.mark.skipif(not cpu_kernels.expected(), reason="GPU machine, or no C++ compiler")


@pytest.fixture(autouse=True)
def built_kernels() -> None:
    assert cpu_native.load(), "the C++ CPU kernels failed to build (see the warning in the log)"


def prefill_rows(batch) -> torch.Tensor:
    """(query start, query length, sequence length, table row) of every sequence with more than one new token."""
    starts, lens = batch.query_start_loc.tolist(), batch.seq_lens.tolist()
    rows = [(starts[i], starts[i + 1] - starts[i], lens[i], i) for i in range(len(lens))]
    return torch.tensor([row for row in rows if row[1] > 1], dtype=torch.long).reshape(-1, 4)


def run_kernel(batch, query: torch.Tensor | None = None, **options) -> torch.Tensor:
    out = torch.full_like(batch.query, float("nan"))  # poisoned: rows the kernel does not own stay NaN
    cpu_native.paged_prefill_attention(
        out,
        batch.query if query is None else query,
        batch.k_cache,
        batch.v_cache,
        batch.block_tables,
        prefill_rows(batch),
        SCALE,
        **options,
    )
    return out


def as_fp32(batch):
    return type(batch)(
        batch.query.float(),
        batch.k_cache.float(),
        batch.v_cache.float(),
        batch.block_tables,
        batch.seq_lens,
        batch.query_start_loc,
        batch.slot_mapping,
        batch.used_slots,
    )


@pytest.mark.parametrize(
    ("num_heads", "num_kv_heads", "head_dim"),
    [(4, 2, 32), (12, 4, 64), (8, 8, 64), (8, 1, 128), (32, 8, 128), (4, 2, 256), (6, 2, 80), (4, 2, 24), (2, 1, 576)],
)
def test_prompts_and_chunks_over_cached_prefixes_match_sdpa(paged_batch, poison, num_heads, num_kv_heads, head_dim):
    """Whole prompts and chunks after cached prefixes, across key-tile (16) and query-tile (32) edges, GQA 1-8,
    head dims on and off the 16-lane grid and above 512; NaN in every cache slot outside the contexts."""
    q_lens = [128, 37, 5, 64, 17, 2, 33]
    seq_lens = [128, 37, 25, 164, 20, 2, 300]
    batch = paged_batch(q_lens, seq_lens, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim)
    batch.k_cache, batch.v_cache = poison(batch.k_cache, batch.used_slots), poison(batch.v_cache, batch.used_slots)
    # fp32 sums in another order than SDPA's over up to 300 keys x 576 dims: a few 1e-5 apart.
    torch.testing.assert_close(run_kernel(batch), sdpa_per_sequence(batch), atol=5e-5, rtol=0)


@pytest.mark.parametrize("block_size", [1, 4, 16, 32, 64])
def test_every_block_size_is_read_through_the_table(paged_batch, block_size):
    """Key tiles of 16 span several blocks (small blocks) or sit inside one (large blocks)."""
    batch = paged_batch([40, 9], [100, 9], num_heads=4, num_kv_heads=2, block_size=block_size)
    torch.testing.assert_close(run_kernel(batch), sdpa_per_sequence(batch), atol=1e-5, rtol=0)


@pytest.mark.parametrize("sliding_window", [1, 7, 16, 33, 100])
@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"), [(4, 2, 32), (8, 2, 64), (4, 4, 24)])
def test_sliding_windows_match_sdpa_and_skip_freed_blocks(
    paged_batch, sliding_window, num_heads, num_kv_heads, head_dim
):
    """Windows of one token, inside a key tile (16), one block, across query tiles (32) and longer than the prompts,
    for whole prompts and chunks after cached prefixes: blocks wholly before every window have table entries of -1
    and the slots before them hold NaN (as the block manager leaves freed blocks)."""
    batch = paged_batch([128, 37, 5, 64, 17, 2], [128, 37, 25, 164, 20, 90], num_heads, num_kv_heads, head_dim)
    expected = sdpa_per_sequence(batch, sliding_window)
    out = run_kernel(drop_blocks_before_windows(batch, sliding_window), sliding_window=sliding_window)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=0)


@pytest.mark.parametrize("sliding_window", [None, 20])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_soft_capped_logits_match_sdpa(paged_batch, sliding_window, dtype):
    """Gemma 2's attention: logits capped with cap * tanh(s / cap) (in bf16 through the bf16 dot products)."""
    batch = paged_batch([64, 9], [80, 9], num_heads=8, num_kv_heads=4, head_dim=64, dtype=dtype)
    batch.query = batch.query * 6  # logits well past the cap of 5
    expected = sdpa_per_sequence(as_fp32(batch), sliding_window, softcap=5.0)
    assert not torch.allclose(expected, sdpa_per_sequence(as_fp32(batch), sliding_window), atol=1e-2)
    out = run_kernel(batch, sliding_window=sliding_window, softcap=5.0)
    tolerance = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), expected, atol=tolerance, rtol=0)


def test_decode_rows_are_left_to_the_decode_kernel(paged_batch):
    """The op writes the prompt rows only: a decode row between two prompts keeps its poison."""
    batch = paged_batch([20, 1, 7], [20, 40, 30], num_heads=4, num_kv_heads=2)
    out, expected = run_kernel(batch), sdpa_per_sequence(batch)
    assert torch.isnan(out[20]).all()
    keep = torch.ones(out.shape[0], dtype=torch.bool)
    keep[20] = False
    torch.testing.assert_close(out[keep], expected[keep], atol=1e-5, rtol=0)


def test_large_scores_stay_finite_and_match(paged_batch):
    """Scores of several hundred: the running maximum rises tile after tile, so earlier sums are rescaled."""
    batch = paged_batch([200], [260], num_heads=4, num_kv_heads=1, head_dim=64)
    positions = torch.arange(batch.k_cache.shape[0] * batch.k_cache.shape[1], dtype=torch.float32)
    ramp = positions.view(batch.k_cache.shape[0], batch.k_cache.shape[1], 1, 1)
    batch.k_cache = batch.k_cache * 0.1 + ramp.sin() * 3  # keys pointing the same way as many queries
    batch.query = batch.query * 20
    out = run_kernel(batch)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, sdpa_per_sequence(batch), atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_caches_match_fp32_attention(paged_batch, dtype):
    """Scores, softmax and sums in fp32 over half-precision reads: within the rounding of the output."""
    batch = paged_batch([128, 50, 3], [128, 180, 70], num_heads=12, num_kv_heads=4, head_dim=64, dtype=dtype)
    out = run_kernel(batch)
    assert out.dtype == dtype
    tolerance = 8e-3 if dtype == torch.bfloat16 else 1e-3
    torch.testing.assert_close(out.float(), sdpa_per_sequence(as_fp32(batch)), atol=tolerance, rtol=0)


def test_strided_query_rows_are_read_in_place(paged_batch):
    """The model hands q as a view into the fused qkv projection (rows wider than H x D)."""
    batch = paged_batch([30, 12], [30, 50], num_heads=4, num_kv_heads=2)
    wide = torch.randn(batch.query.shape[0], batch.query.shape[1] + 3, batch.query.shape[2])
    wide[:, : batch.query.shape[1]] = batch.query
    strided = wide[:, : batch.query.shape[1]]
    assert not strided.is_contiguous()
    torch.testing.assert_close(run_kernel(batch, strided), sdpa_per_sequence(batch), atol=1e-5, rtol=0)


@pytest.mark.parametrize("prefill_kernel", [True, False], ids=["prompts-in-kernel", "prompts-in-sdpa"])
def test_a_mixed_step_through_the_backend_matches_sdpa(paged_batch, prefill_kernel):
    """Prompts, chunks and decode rows in one step, every row written; prompts through the prefill kernel or, where
    it was built without its vector tiles, through SDPA."""
    batch = paged_batch([3, 1, 5, 1, 1, 0, 20, 64], [3, 40, 21, 16, 9, 4, 20, 100], num_heads=8, num_kv_heads=2)
    backend = CpuBackend()
    backend.prefill_kernel = prefill_kernel
    out = torch.full_like(batch.query, float("nan"))
    backend.attention(batch.query, batch.k_cache, batch.v_cache, batch.metadata(), SCALE, out)
    torch.testing.assert_close(out, sdpa_per_sequence(batch), atol=1e-5, rtol=0)


def test_prompts_use_the_kernel_where_it_is_built_with_avx512():
    prebuilt = cpu_prebuilt.usable_level()
    if prebuilt is not None:  # the image's libraries (test_cpu_kernels_portable.py runs this with x86-64-v3)
        assert CpuBackend().prefill_kernel == ("avx512f" in prebuilt.requires)
        return
    if cpu_build.target() not in ("auto", "native"):
        pytest.skip("CPU_KERNELS_TARGET names a custom build, whose instructions are not known here")
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
    assert CpuBackend().prefill_kernel == ("avx512f" in flags and platform.machine() in ("x86_64", "AMD64"))


def test_a_block_id_outside_the_cache_raises_instead_of_reading_past_it(paged_batch):
    batch = paged_batch([10, 30], [10, 40], num_heads=4, num_kv_heads=2)
    batch.block_tables[1, 2] = batch.k_cache.shape[0]  # one past the last block
    with pytest.raises(RuntimeError, match="outside the cache"):
        run_kernel(batch)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ((0, 10, 500, 0), "outside its block table"),  # more tokens than the table row holds
        ((0, 10, 5, 0), "outside its block table"),  # fewer tokens than the query has
        ((35, 10, 10, 0), "outside the query"),  # query rows past the end
        ((0, 10, 10, 7), "table row out of range"),
    ],
)
def test_bad_prompt_rows_raise(paged_batch, row, message):
    batch = paged_batch([10, 30], [10, 40], num_heads=4, num_kv_heads=2)
    out = torch.empty_like(batch.query)
    with pytest.raises(RuntimeError, match=message):
        cpu_native.paged_prefill_attention(
            out,
            batch.query,
            batch.k_cache,
            batch.v_cache,
            batch.block_tables,
            torch.tensor([row], dtype=torch.long),
            SCALE,
        )


@pytest.mark.parametrize("op", ["prefill", "decode"])
def test_tensors_that_do_not_fit_together_raise(paged_batch, op):
    """The argument checks both attention ops share (csrc/cpu_paged_checks.h)."""
    batch = paged_batch([10, 1], [10, 40], num_heads=4, num_kv_heads=2)
    rows = torch.tensor([10], dtype=torch.long)
    seqs = torch.tensor([1], dtype=torch.long)

    def call(out, query):
        if op == "prefill":
            cpu_native.paged_prefill_attention(
                out, query, batch.k_cache, batch.v_cache, batch.block_tables, prefill_rows(batch), SCALE
            )
        else:
            cpu_native.paged_decode_attention(
                out, query, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens, rows, seqs, SCALE
            )

    with pytest.raises(RuntimeError, match="share a dtype"):
        call(torch.empty_like(batch.query, dtype=torch.float64), batch.query)
    three_heads = batch.query[:, :3].contiguous()
    with pytest.raises(RuntimeError, match="heads do not match"):
        call(torch.empty_like(three_heads), three_heads)
    with pytest.raises(RuntimeError, match="shaped like query"):
        call(torch.empty(1, 4, batch.query.shape[2]), batch.query)
