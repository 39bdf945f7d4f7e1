"""The C++ CPU elementwise kernels against the torch layers they replace (the same roundings, fp32 inside)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model_handler.kernels import cpu_fused, cpu_native
from model_handler.layers.activation import SiluAndMul
from model_handler.layers.norm import RMSNorm
from model_handler.layers.rotary import RotaryEmbedding, apply_rotary, rope_inv_freq
from tests import cpu_kernels
from tests.model_handler.model_factories import family_config

# Justified skip: on a GPU machine the build would only spend device time; without a C++ compiler there is
# nothing to build. Where a compiler exists, a failed build fails every test here (the fixture below).
pytestmark = pytest.mark.skipif(not cpu_kernels.expected(), reason="GPU machine, or no C++ compiler")


@pytest.fixture(autouse=True)
def kernels_built():
    assert cpu_native.load(), "the C++ CPU kernels failed to build (see the warning in the log)"


DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ONE_STEP = {torch.float32: 1e-5, torch.bfloat16: 2**-7, torch.float16: 2**-10}  # relative: one rounding step


def random(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 100, 768])  # 100: not a multiple of the 16-wide lanes
def test_add_rms_norm_matches_the_torch_layer(dtype, hidden):
    x, residual = random(37, hidden, dtype=dtype), random(37, hidden, dtype=dtype, seed=1)
    norm = RMSNorm(hidden, 1e-6)
    norm.weight.data = random(hidden, seed=2).to(dtype)
    expected, expected_sum = norm.forward_with_residual(x, residual)  # the unfused torch ops
    out, summed = cpu_fused.add_rms_norm(x, residual, norm.weight, 1e-6)
    assert torch.equal(summed, expected_sum)  # the residual stream is exactly torch's add
    assert out.dtype == dtype
    torch.testing.assert_close(out, expected, atol=ONE_STEP[dtype], rtol=ONE_STEP[dtype])


def test_add_rms_norm_is_hf_llama_rms_norm_in_fp32():
    x, weight = random(9, 256, seed=3), random(256, seed=4)
    variance = x.pow(2).mean(-1, keepdim=True)
    expected = weight * (x * torch.rsqrt(variance + 1e-5))  # transformers' LlamaRMSNorm
    out, residual = cpu_fused.add_rms_norm(x, None, weight, 1e-5)
    assert residual is x
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)


def test_add_rms_norm_reads_strided_rows_and_handles_no_tokens():
    wide = random(4, 128)
    x = wide[:, :64]  # row stride 128
    out, _ = cpu_fused.add_rms_norm(x, wide[:, 64:], torch.ones(64), 1e-6)
    torch.testing.assert_close(out, F.rms_norm(x + wide[:, 64:], (64,), torch.ones(64), 1e-6), atol=1e-6, rtol=1e-6)
    out, summed = cpu_fused.add_rms_norm(torch.empty(0, 64), torch.empty(0, 64), torch.ones(64), 1e-6)
    assert out.shape == summed.shape == (0, 64)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_matches_the_torch_layer(dtype):
    x = random(33, 2 * 200, dtype=dtype) * 4  # gates well into both tails of the sigmoid
    x[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -0.0])
    out = cpu_fused.silu_and_mul(x)
    expected = SiluAndMul(None)(x)
    assert out.shape == (33, 200) and out.dtype == dtype
    torch.testing.assert_close(out, expected, atol=ONE_STEP[dtype], rtol=ONE_STEP[dtype])


def test_silu_and_mul_reads_strided_rows():
    wide = random(5, 300)
    x = wide[:, :256]
    torch.testing.assert_close(cpu_fused.silu_and_mul(x), SiluAndMul(None)(x), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("partial", [False, True])  # rotary_dim == head_dim, or the first half only
def test_rotary_matches_the_torch_rotation_in_place_on_a_strided_view(dtype, partial):
    config = family_config("llama_gqa")
    head_dim = 64
    inv_freq, scaling = rope_inv_freq(config, head_dim // 2 if partial else head_dim)
    rotary = RotaryEmbedding(inv_freq, scaling, 256, dtype)
    positions = torch.tensor([0, 5, 255, 17, 17, 100])
    qkv = random(6, 8, head_dim, dtype=dtype, seed=5)
    qk = qkv[:, :6]  # q and k heads of a fused projection: token stride 8 heads
    expected = apply_rotary(qk, (rotary.cos_sin_cache[positions, 0:1], rotary.cos_sin_cache[positions, 1:2]))
    untouched = qkv[:, 6:].clone()
    assert cpu_fused.rotary_(qk, rotary.cos_sin_cache, positions) is qk
    torch.testing.assert_close(qkv[:, :6], expected, atol=ONE_STEP[dtype], rtol=ONE_STEP[dtype])
    assert torch.equal(qkv[:, 6:], untouched)  # the v heads are not touched


def test_bad_inputs_raise_instead_of_reading_past_them():
    rotary = RotaryEmbedding(torch.ones(16), 1.0, 8, torch.float32)
    with pytest.raises(RuntimeError, match="position outside"):
        cpu_fused.rotary_(random(2, 2, 32), rotary.cos_sin_cache, torch.tensor([0, 8]))
    with pytest.raises(RuntimeError, match="weight"):
        cpu_fused.add_rms_norm(random(2, 32), None, torch.ones(16), 1e-6)
    with pytest.raises(RuntimeError, match="2d"):
        cpu_fused.silu_and_mul(random(2, 33))
