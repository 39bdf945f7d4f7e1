"""CPU linears through oneDNN with a packed weight: same results as F.linear, and a changed weight is seen."""

from __future__ import annotations

import platform

import pytest
import torch
import torch.nn.functional as F

from model_handler.cpu_features import has_native_bf16
from model_handler.layers import cpu_linear
from model_handler.layers.cpu_linear import PackedWeight, linear, packed_linear_available
from model_handler.layers.linear import ColumnParallelLinear

# Only the platform may excuse these tests: an x86 torch built with oneDNN (the pinned CPU wheel, CI) must run them,
# so a broken availability probe fails `test_available_where_onednn_is_built_in` instead of skipping them all.
ONEDNN_PLATFORM = platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available()
needs_onednn = pytest.mark.skipif(not ONEDNN_PLATFORM, reason="not an x86 torch build with oneDNN")


@needs_onednn
def test_available_where_onednn_is_built_in():
    assert packed_linear_available()


@needs_onednn
@pytest.mark.parametrize("shape", [(32, 256), (3, 5, 256)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_f_linear(shape, with_bias):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=gen)
    weight = torch.randn(512, 256, generator=gen) * 0.05
    bias = torch.randn(512, generator=gen) if with_bias else None
    packed = PackedWeight()
    out = linear(x, weight, bias, packed)
    assert packed.packed is not None  # the oneDNN path ran
    torch.testing.assert_close(out, F.linear(x, weight, bias), atol=1e-5, rtol=1e-5)


@needs_onednn
def test_bf16_is_packed_only_where_the_cpu_computes_it_natively():
    assert packed_linear_available(torch.bfloat16) == has_native_bf16()
    assert not packed_linear_available(torch.float16)


@pytest.mark.parametrize("rows", [1, 7, 64])
@pytest.mark.parametrize("with_bias", [False, True])
def test_bf16_packed_matches_f_linear_at_every_size(rows, with_bias):
    """Packed at every size where the CPU has native bf16 (the probe is checked in test_cpu_features.py);
    F.linear elsewhere. The results match either way."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(rows, 128, generator=gen).bfloat16()
    weight = (torch.randn(96, 128, generator=gen) * 0.05).bfloat16()  # one row x this is a small product
    bias = torch.randn(96, generator=gen).bfloat16() if with_bias else None
    packed = PackedWeight()
    out = linear(x, weight, bias, packed)
    assert out.dtype == torch.bfloat16
    assert (packed.packed is not None) == has_native_bf16()  # oneDNN ran where native, even at one row
    # Both accumulate in fp32; they may round the bf16 output differently by one unit.
    torch.testing.assert_close(
        out.float(), F.linear(x.float(), weight.float(), None if bias is None else bias.float()), atol=2e-2, rtol=2e-2
    )


@needs_onednn
def test_small_products_stay_on_f_linear():
    packed = PackedWeight()
    x, weight = torch.randn(1, 64), torch.randn(64, 64)
    assert torch.equal(linear(x, weight, None, packed), F.linear(x, weight))
    assert packed.packed is None


@needs_onednn
def test_weight_loaded_after_a_forward_is_repacked():
    layer = ColumnParallelLinear(256, 512)
    layer.weight.weight_loader(layer.weight, torch.ones(512, 256))
    x = torch.randn(32, 256)
    with torch.inference_mode():
        first = layer(x)
        layer.weight.weight_loader(layer.weight, torch.full((512, 256), 2.0))  # a new checkpoint, in place
        second = layer(x)
    torch.testing.assert_close(second, 2 * first)


def test_disabled_means_f_linear(monkeypatch):
    monkeypatch.setattr(cpu_linear, "enabled", False)
    packed = PackedWeight()
    x, weight = torch.randn(64, 256), torch.randn(512, 256)
    assert torch.equal(linear(x, weight, None, packed), F.linear(x, weight))
    assert packed.packed is None
