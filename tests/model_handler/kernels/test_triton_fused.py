"""The fused elementwise kernels (interpreted on CPU) against the torch ops they replace in the layers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model_handler.kernels import triton_fused
from model_handler.layers.activation import SiluAndMul
from model_handler.layers.norm import RMSNorm
from model_handler.layers.rotary import RotaryEmbedding, apply_rotary, rope_inv_freq
from tests.model_handler.model_factories import family_config

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def random(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def check_add_rms_norm(dtype: torch.dtype, hidden: int, device: str) -> None:
    x, residual = random(5, hidden, dtype=dtype).to(device), random(5, hidden, dtype=dtype, seed=1).to(device)
    weight = random(hidden, seed=2).to(device, dtype)
    out, summed = triton_fused.add_rms_norm(x, residual, weight, 1e-6)
    expected_sum = x + residual
    if dtype == torch.float32 or device == "cuda":
        assert torch.equal(summed, expected_sum)  # the residual stream is exactly the unfused one
    else:  # the interpreter rounds fp32 -> bf16 toward zero, the GPU to nearest: one bf16 step apart at most
        torch.testing.assert_close(summed, expected_sum, atol=0, rtol=2**-7)
    expected = F.rms_norm(summed.float(), (hidden,), weight.float(), 1e-6)
    torch.testing.assert_close(out.float(), expected, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])
    assert out.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden", [64, 96])  # 96: the block is wider than the row
def test_add_rms_norm_matches_the_add_then_norm(dtype, hidden):
    check_add_rms_norm(dtype, hidden, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("hidden", [4096, 5120])
def test_add_rms_norm_on_gpu_keeps_the_residual_stream_exact(hidden):
    check_add_rms_norm(torch.bfloat16, hidden, "cuda")


def test_add_rms_norm_without_residual_returns_the_input_as_the_residual():
    x, weight = random(3, 64), random(64, seed=1)
    out, residual = triton_fused.add_rms_norm(x, None, weight, 1e-5)
    assert residual is x
    torch.testing.assert_close(out, F.rms_norm(x, (64,), weight, 1e-5))


def test_add_rms_norm_reads_strided_rows_and_handles_no_tokens():
    wide = random(4, 128)
    x = wide[:, :64]  # row stride 128
    out, _ = triton_fused.add_rms_norm(x, None, torch.ones(64), 1e-6)
    torch.testing.assert_close(out, F.rms_norm(x, (64,), torch.ones(64), 1e-6))
    empty_out, empty_residual = triton_fused.add_rms_norm(torch.empty(0, 64), torch.empty(0, 64), torch.ones(64), 1e-6)
    assert empty_out.shape == empty_residual.shape == (0, 64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d", [64, triton_fused.SILU_BLOCK + 40])  # the second spans two programs, one partial
def test_silu_and_mul_matches_torch(dtype, d, device):
    x = random(3, 2 * d, dtype=dtype).to(device)
    out = triton_fused.silu_and_mul(x)
    expected = F.silu(x[:, :d].float()) * x[:, d:].float()
    torch.testing.assert_close(out.float(), expected, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])
    assert out.shape == (3, d) and out.dtype == dtype


def rope_table(rotary_dim: int, dtype: torch.dtype, device: str) -> RotaryEmbedding:
    config = family_config("llama3_rope")  # scaled frequencies: not just the default table
    inv_freq, scaling = rope_inv_freq(config, rotary_dim)
    with torch.device(device):
        return RotaryEmbedding(inv_freq, scaling, 64, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim,rotary_dim", [(32, 32), (48, 32)])  # full and partial rotary
def test_rotary_in_place_matches_apply_rotary_on_a_strided_view(dtype, head_dim, rotary_dim, device):
    """q and k heads are a view into the fused qkv output; v (after them) must come out untouched."""
    num_q, num_kv, tokens = 9, 3, 6  # 12 rotated heads: two head blocks, the second partial
    rope = rope_table(rotary_dim, dtype, device)
    qkv = random(tokens, num_q + 2 * num_kv, head_dim, dtype=dtype, seed=4).to(device)
    before = qkv.clone()
    positions = torch.tensor([0, 5, 63, 17, 17, 2], device=device)
    expected = apply_rotary(qkv[:, : num_q + num_kv], _rows(rope, positions))
    returned = triton_fused.rotary_(qkv[:, : num_q + num_kv], rope.cos_sin_cache, positions)
    assert returned.data_ptr() == qkv.data_ptr()
    torch.testing.assert_close(
        qkv[:, : num_q + num_kv].float(), expected.float(), atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype]
    )
    assert torch.equal(qkv[:, num_q + num_kv :], before[:, num_q + num_kv :])  # v untouched


def _rows(rope: RotaryEmbedding, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows = rope.lookup(positions)
    return rows.cos, rows.sin


def test_layers_use_the_fused_kernels_they_are_given():
    """RMSNorm, SiluAndMul and the rotary give the same results with the Triton kernels as without."""
    x, residual = random(4, 64), random(4, 64, seed=1)
    plain, fused = RMSNorm(64, 1e-6), RMSNorm(64, 1e-6, triton_fused)
    fused.weight.data.copy_(random(64, seed=3))
    plain.weight.data.copy_(fused.weight.data)
    for a, b in zip(plain.forward_with_residual(x, residual), fused.forward_with_residual(x, residual)):
        torch.testing.assert_close(a, b)
    gate_up = random(4, 128, seed=5)
    torch.testing.assert_close(SiluAndMul()(gate_up), SiluAndMul(triton_fused)(gate_up))
    positions = torch.tensor([3, 1, 0, 7])
    inv_freq, scaling = rope_inv_freq(family_config("llama_gqa"), 32)
    plain_rope = RotaryEmbedding(inv_freq, scaling, 16, torch.float32)
    fused_rope = RotaryEmbedding(inv_freq, scaling, 16, torch.float32, triton_fused)
    heads = random(4, 5, 32, seed=6)
    torch.testing.assert_close(
        plain_rope.lookup(positions).apply(heads), fused_rope.lookup(positions).apply(heads.clone())
    )
