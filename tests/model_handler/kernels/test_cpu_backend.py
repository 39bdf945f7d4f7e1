"""The C++ CPU decode kernel and the CPU backend around it, against plain SDPA on unpaged keys and values."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model_handler.kernels import TorchReferenceBackend, cpu_build, cpu_native, select_backend
from model_handler.kernels.cpu_backend import CpuBackend
from tests import cpu_kernels
from tests.model_handler.kernels.test_reference import (
    SCALE,
    WINDOW_CASES,
    drop_blocks_before_windows,
    sdpa_per_sequence,
)

REPO = Path(__file__).resolve().parents[3]

# Justified skip: on a GPU machine the kernel batches live on the GPU and the build would only spend device
# time; without a C++ compiler there is nothing to build. Where a compiler exists, a failed build fails here.
pytestmark = pytest.mark.skipif(not cpu_kernels.expected(), reason="GPU machine, or no C++ compiler")


def test_the_kernels_build_where_a_compiler_exists():
    assert cpu_native.load(), "the C++ CPU kernels failed to build (see the warning in the log)"


def run_cpu_backend(batch, prefill_kernel: bool | None = None, **options) -> torch.Tensor:
    out = torch.full_like(batch.query, float("nan"))  # poisoned: every row must be written
    backend = CpuBackend()
    if prefill_kernel is not None:
        backend.prefill_kernel = prefill_kernel
    backend.attention(batch.query, batch.k_cache, batch.v_cache, batch.metadata(), SCALE, out, **options)
    return out


@pytest.mark.parametrize(
    ("num_heads", "num_kv_heads", "head_dim"),
    [(4, 2, 32), (12, 4, 64), (8, 8, 64), (8, 1, 128), (32, 8, 128), (4, 2, 256), (6, 2, 80), (4, 2, 24)],
)
def test_decode_rows_match_sdpa(paged_batch, poison, num_heads, num_kv_heads, head_dim):
    """Ragged lengths around block boundaries (block 16), GQA ratios 1-8, head dims with and without the
    AVX-512 paths (64, 128, 256; 24, 32, 80); NaN in every cache slot outside the contexts."""
    seq_lens = [1, 15, 16, 17, 33, 48, 5, 200]
    batch = paged_batch(
        [1] * len(seq_lens), seq_lens, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim
    )
    batch.k_cache, batch.v_cache = poison(batch.k_cache, batch.used_slots), poison(batch.v_cache, batch.used_slots)
    torch.testing.assert_close(run_cpu_backend(batch), sdpa_per_sequence(batch), atol=1e-5, rtol=0)


@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"), [(12, 4, 64), (32, 8, 128), (8, 1, 64), (6, 3, 80)])
@pytest.mark.parametrize("seq_lens", [[700], [300, 5, 129]], ids=["one-row", "three-rows"])
def test_few_rows_split_their_kv_heads_across_threads_and_match_sdpa(
    paged_batch, poison, num_heads, num_kv_heads, head_dim, seq_lens
):
    """With fewer rows than the threads can use, each row's kv heads are cut into pieces that run in parallel
    (one kv head alone, uneven pieces, a single kv head that cannot be cut)."""
    batch = paged_batch(
        [1] * len(seq_lens), seq_lens, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim
    )
    batch.k_cache, batch.v_cache = poison(batch.k_cache, batch.used_slots), poison(batch.v_cache, batch.used_slots)
    torch.testing.assert_close(run_cpu_backend(batch), sdpa_per_sequence(batch), atol=1e-5, rtol=0)


def test_decode_rows_between_prompt_rows_match_sdpa(paged_batch):
    """A mixed step: the decode rows between prompts and prompt chunks go through the decode kernel."""
    batch = paged_batch([3, 1, 5, 1, 1, 0, 20], [3, 40, 21, 16, 9, 4, 20], num_heads=8, num_kv_heads=2)
    torch.testing.assert_close(run_cpu_backend(batch), sdpa_per_sequence(batch), atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_caches_match_fp32_attention(paged_batch, dtype):
    """Scores, softmax and sums in fp32 over half-precision reads: within the rounding of the inputs."""
    batch = paged_batch([1] * 5, [7, 16, 64, 130, 300], num_heads=12, num_kv_heads=4, head_dim=64, dtype=dtype)
    exact = sdpa_per_sequence(
        type(batch)(
            batch.query.float(),
            batch.k_cache.float(),
            batch.v_cache.float(),
            batch.block_tables,
            batch.seq_lens,
            batch.query_start_loc,
            batch.slot_mapping,
            batch.used_slots,
        )
    )
    out = run_cpu_backend(batch)
    assert out.dtype == dtype
    tolerance = 8e-3 if dtype == torch.bfloat16 else 1e-3
    torch.testing.assert_close(out.float(), exact, atol=tolerance, rtol=0)


def test_strided_query_rows_are_read_in_place(paged_batch):
    """The model hands q as a view into the fused qkv projection (rows wider than H x D)."""
    batch = paged_batch([1, 1, 1], [5, 40, 17], num_heads=4, num_kv_heads=2)
    wide = torch.randn(batch.query.shape[0], batch.query.shape[1] + 3, batch.query.shape[2])
    wide[:, : batch.query.shape[1]] = batch.query
    strided = wide[:, : batch.query.shape[1]]
    assert not strided.is_contiguous()
    out = torch.empty_like(batch.query)
    CpuBackend().attention(strided, batch.k_cache, batch.v_cache, batch.metadata(), SCALE, out)
    torch.testing.assert_close(out, sdpa_per_sequence(batch), atol=1e-5, rtol=0)


def test_table_entries_past_a_sequence_are_ignored(paged_batch):
    batch = paged_batch([1, 1], [5, 40], num_heads=4, num_kv_heads=2)
    expected = run_cpu_backend(batch)
    tables = batch.block_tables.clone()
    tables[0, 1:] = -1  # sequence 0 has 5 tokens: only its first block is read
    tables[1, 3:] = 10**6
    batch.block_tables = tables
    torch.testing.assert_close(run_cpu_backend(batch), expected, atol=0, rtol=0)


def test_a_block_id_outside_the_cache_raises_instead_of_reading_past_it(paged_batch):
    batch = paged_batch([1, 1], [5, 40], num_heads=4, num_kv_heads=2)
    batch.block_tables[1, 1] = batch.k_cache.shape[0]  # one past the last block
    with pytest.raises(RuntimeError, match="outside the cache"):
        run_cpu_backend(batch)


@pytest.mark.parametrize("case", sorted(WINDOW_CASES))
@pytest.mark.parametrize("sliding_window", [1, 5, 16, 40])
@pytest.mark.parametrize("head_dim", [32, 64])
@pytest.mark.parametrize("prefill_kernel", [True, False], ids=["prompts-in-kernel", "prompts-in-sdpa"])
def test_sliding_windows_match_sdpa_and_skip_freed_blocks(paged_batch, case, sliding_window, head_dim, prefill_kernel):
    """Decode rows (plain loops at head dim 32, AVX-512 register tiles at 64) and prompts (the prefill kernel, or
    SDPA where it lacks its vector tiles) with windows of one token, inside a block, one block (16) and longer than
    most contexts; blocks wholly before the windows have table entries of -1 and the slots before them hold NaN."""
    q_lens, seq_lens = WINDOW_CASES[case]
    batch = paged_batch(q_lens, seq_lens, num_heads=8, num_kv_heads=2, head_dim=head_dim, seed=sliding_window)
    expected = sdpa_per_sequence(batch, sliding_window)
    freed = drop_blocks_before_windows(batch, sliding_window, nan_slots=prefill_kernel)  # SDPA gathers whole blocks
    out = run_cpu_backend(freed, prefill_kernel, sliding_window=sliding_window)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("sliding_window", [None, 7])
@pytest.mark.parametrize("head_dim", [32, 256])
def test_soft_capped_logits_match_sdpa(paged_batch, sliding_window, head_dim):
    """Gemma 2's attention (head dim 256, logits capped with cap * tanh(s / cap)), with and without its window."""
    batch = paged_batch([1, 12, 1, 30, 1], [40, 12, 1, 45, 17], num_heads=4, num_kv_heads=2, head_dim=head_dim)
    batch.query = batch.query * 8  # logits well past the cap of 5
    expected = sdpa_per_sequence(batch, sliding_window, softcap=5.0)
    assert not torch.allclose(expected, sdpa_per_sequence(batch, sliding_window), atol=1e-2)
    out = run_cpu_backend(batch, sliding_window=sliding_window, softcap=5.0)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_window_and_cap_over_half_precision_caches(paged_batch, dtype):
    batch = paged_batch([1, 40, 1], [70, 60, 300], num_heads=8, num_kv_heads=4, head_dim=64, dtype=dtype)
    exact = sdpa_per_sequence(
        type(batch)(
            batch.query.float(),
            batch.k_cache.float(),
            batch.v_cache.float(),
            batch.block_tables,
            batch.seq_lens,
            batch.query_start_loc,
            batch.slot_mapping,
            batch.used_slots,
        ),
        sliding_window=33,
        softcap=20.0,
    )
    out = run_cpu_backend(batch, sliding_window=33, softcap=20.0)
    tolerance = 8e-3 if dtype == torch.bfloat16 else 1e-3
    torch.testing.assert_close(out.float(), exact, atol=tolerance, rtol=0)


def test_cpu_is_the_default_backend_where_the_kernel_builds():
    assert select_backend(torch.device("cpu")).name == "cpu"
    assert select_backend(torch.device("cpu"), "torch").name == "torch"


def test_without_the_kernel_the_default_falls_back_to_torch_and_forcing_it_fails(monkeypatch):
    monkeypatch.setattr(cpu_native, "load", lambda: False)
    assert isinstance(select_backend(torch.device("cpu")), TorchReferenceBackend)
    with pytest.raises(RuntimeError, match="could not be built"):
        select_backend(torch.device("cpu"), "cpu")


# Justified skip: it checks the C++ builder, which a machine with only the prebuilt library never runs.
@pytest.mark.skipif(not cpu_kernels.has_compiler(), reason="builds C++: a prebuilt library alone cannot")
def test_a_builder_that_died_mid_build_does_not_stall_the_next_one(tmp_path):
    """A builder killed mid-build (a server stopped during its first start) leaves torch's lock file behind, on
    which torch's builder would wait forever: the next build in that folder goes ahead."""
    source = tmp_path / "tiny.cpp"
    source.write_text("int sagemaker_llm_tiny() { return 1; }\n")
    folder = tmp_path / "build"
    probe = (
        "import sys; from pathlib import Path; from model_handler.kernels import cpu_build; "
        "cpu_build.build((Path(sys.argv[1]),), Path(sys.argv[2])); print('built')"
    )
    command = [sys.executable, "-c", probe, str(source), str(folder)]
    first = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0 and "built" in first.stdout, first.stderr[-2000:]
    (folder / "lock").touch()  # torch's baton, as a builder killed mid-build leaves it
    second = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0 and "built" in second.stdout, second.stderr[-2000:]
    assert not (folder / "lock").exists()


def test_a_source_that_does_not_compile_raises_and_load_reports_it(tmp_path, monkeypatch, caplog):
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++;\n")
    with pytest.raises(RuntimeError, match="Error building extension"):
        cpu_build.build((broken,), tmp_path / "build")
    # load() turns the same failure into False and a warning (the engine then uses the torch path).
    monkeypatch.setattr(cpu_native, "registered", lambda: False)
    monkeypatch.setattr(cpu_build, "SOURCES", (broken,))
    monkeypatch.setenv("CPU_KERNELS_BUILD_DIR", str(tmp_path / "builds"))
    with caplog.at_level(logging.WARNING, logger=cpu_native.__name__):
        assert cpu_native.load.__wrapped__() is False
    assert "C++ CPU kernels unavailable" in caplog.text


def test_build_folders_are_keyed_by_source_torch_and_cpu(monkeypatch, tmp_path):
    monkeypatch.setenv("CPU_KERNELS_BUILD_DIR", str(tmp_path))
    first = cpu_build.build_dir()
    assert first.parent == tmp_path
    monkeypatch.setattr(cpu_build, "_cpu_fingerprint", lambda: "another cpu")
    assert cpu_build.build_dir() != first


def test_ninja_from_the_package_is_found_without_an_activated_venv(monkeypatch, tmp_path):
    import ninja

    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH with no ninja on it (`make test` does not activate .venv)
    cpu_build.put_ninja_on_path()
    assert os.environ["PATH"].split(os.pathsep)[0] == ninja.BIN_DIR
    assert shutil.which("ninja") is not None
