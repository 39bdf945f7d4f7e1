"""The one-row Triton GEMV (interpreted on CPU) against F.linear, and how a kernel is chosen per weight shape."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

from model_handler.kernels import triton_gemv
from model_handler.layers import gpu_linear


def random(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("config", triton_gemv.CONFIGS, ids=str)
# Ragged row blocks; K a multiple of every chunk or not; more row blocks than a fixed grid's programs.
@pytest.mark.parametrize("n, k", [(37, 1024), (9, 300), (133, 512)])
def test_every_config_computes_the_linear(config, n, k):
    x, weight, bias = random(1, k), random(n, k, seed=1), random(n, seed=2)
    # fp32 sums of ~1000 unit products in another order: agreement to ~1e-5 of the result's scale.
    close = dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(triton_gemv.gemv(x, weight, bias, config), F.linear(x, weight, bias), **close)
    torch.testing.assert_close(triton_gemv.gemv(x, weight, None, config), F.linear(x, weight), **close)


def test_bf16_accumulates_in_fp32_and_rounds_once():
    x, weight = random(1, 512, dtype=torch.bfloat16), random(24, 512, dtype=torch.bfloat16, seed=1)
    y = triton_gemv.gemv(x, weight, None, triton_gemv.CONFIGS[1])
    assert y.dtype == torch.bfloat16 and y.shape == (1, 24)
    exact = F.linear(x.double(), weight.double())
    # One bf16 rounding of an fp32 sum (the interpreter rounds toward zero: up to one step of 2^-7).
    torch.testing.assert_close(y.double(), exact, atol=1e-3, rtol=2**-7)


def test_a_strided_weight_view_is_read_row_by_row():
    full = random(16, 640, seed=3)
    weight = full[:, :512]  # rows 640 apart: a column slice of a wider matrix
    x = random(1, 512)
    y = triton_gemv.gemv(x, weight, None, triton_gemv.CONFIGS[0])
    torch.testing.assert_close(y, F.linear(x, weight), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("x", [random(2, 64), random(1, 32), random(1, 128)[:, ::2]])
def test_inputs_it_cannot_take_are_refused(x):
    with pytest.raises(ValueError):
        triton_gemv.gemv(x, random(8, 64), None, triton_gemv.CONFIGS[0])


def perf_timer(fn) -> float:
    began = time.perf_counter()
    for _ in range(3):
        fn()
    return (time.perf_counter() - began) / 3 * 1e3


def test_the_fastest_candidate_that_computes_the_reference_wins():
    x, weight = random(1, 64), random(32, 64, seed=1)

    def slow_but_right():
        time.sleep(0.01)
        return F.linear(x, weight)

    def broken_build():
        raise RuntimeError("out of shared memory")

    candidates = {
        "cublas": lambda: (time.sleep(0.005), F.linear(x, weight))[1],
        "fast and wrong": lambda: torch.zeros(1, 32),
        "slow": slow_but_right,
        "fails": broken_build,
        "fast": lambda: F.linear(x, weight),
    }
    winner, timings = gpu_linear.fastest_correct(candidates, perf_timer, reference="cublas")
    assert winner == "fast"
    assert set(timings) == {"cublas", "slow", "fast"}  # the wrong and the failing one are not candidates
    assert timings["slow"] > timings["cublas"] > timings["fast"]


def test_the_reference_wins_when_nothing_beats_it():
    x, weight = random(1, 64), random(32, 64, seed=1)
    candidates = {"cublas": lambda: F.linear(x, weight), "slow": lambda: (time.sleep(0.01), F.linear(x, weight))[1]}
    assert gpu_linear.fastest_correct(candidates, perf_timer, reference="cublas")[0] == "cublas"


def test_only_single_half_precision_rows_are_candidates():
    weight = random(8, 64, dtype=torch.bfloat16)
    assert gpu_linear._gemv_applies(random(1, 64, dtype=torch.bfloat16), weight, None)
    assert not gpu_linear._gemv_applies(random(2, 64, dtype=torch.bfloat16), weight, None)  # a batch: cuBLAS
    assert not gpu_linear._gemv_applies(random(1, 64), random(8, 64), None)  # fp32 stays on cuBLAS
    assert not gpu_linear._gemv_applies(random(1, 128, dtype=torch.bfloat16)[:, ::2], weight, None)


@pytest.mark.gpu
def test_one_row_linears_on_gpu_are_chosen_once_and_match_cublas():
    x = random(1, 4096, dtype=torch.bfloat16).cuda()
    weight = random(6144, 4096, dtype=torch.bfloat16, seed=1).cuda() * 0.02
    y = gpu_linear.linear(x, weight, None)
    torch.testing.assert_close(y, F.linear(x, weight), atol=2e-2, rtol=2e-2)
    choice = next(c for c in gpu_linear.choices() if c.shape == (6144, 4096))
    assert gpu_linear.CUBLAS in choice.timings_ms and len(choice.timings_ms) > 1
    assert str(choice.winner) in choice.timings_ms
    assert gpu_linear.linear(x, weight, None).shape == (1, 6144) and len(gpu_linear.choices()) >= 1
