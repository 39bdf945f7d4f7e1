"""The fused Triton KV store against `reference.store_kv` (interpreter on CPU)."""

from __future__ import annotations

import pytest
import torch

from model_handler.kernels import reference
from model_handler.kernels.triton_kv_store import store_kv

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def make_store_case(num_tokens=7, num_kv_heads=2, head_dim=32, num_blocks=5, block_size=4, dtype=torch.float32):
    gen = torch.Generator().manual_seed(num_tokens + head_dim)
    key = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(dtype).to(DEVICE)
    value = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(dtype).to(DEVICE)
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(cache_shape, generator=gen).to(dtype).to(DEVICE)
    v_cache = torch.randn(cache_shape, generator=gen).to(dtype).to(DEVICE)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens].to(DEVICE)
    return key, value, k_cache, v_cache, slots


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_store_matches_reference_and_skips_negative_slots(dtype):
    key, value, k_cache, v_cache, slots = make_store_case(dtype=dtype)
    slots[2] = -1  # padding rows of a CUDA-graph batch
    slots[5] = -7
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    reference.store_kv(key, value, expected_k, expected_v, slots)
    store_kv(key, value, k_cache, v_cache, slots)
    # Bit-exact: a store is a copy; every slot not named (including the skipped rows') keeps its old value.
    assert torch.equal(k_cache, expected_k)
    assert torch.equal(v_cache, expected_v)


def test_store_many_heads_per_program_and_a_strided_key_view():
    num_tokens, num_kv_heads, head_dim = 5, 3, 16  # 3 heads: the head tile is padded and masked
    key, value, k_cache, v_cache, slots = make_store_case(num_tokens, num_kv_heads, head_dim)
    fused = torch.randn(num_tokens, 2 * num_kv_heads + 1, head_dim, device=DEVICE)  # [tokens, k|v|spare, D]
    fused[:, :num_kv_heads] = key
    fused[:, num_kv_heads : 2 * num_kv_heads] = value
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    reference.store_kv(key, value, expected_k, expected_v, slots)
    store_kv(fused[:, :num_kv_heads], fused[:, num_kv_heads : 2 * num_kv_heads], k_cache, v_cache, slots)
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)


def test_store_casts_to_the_cache_dtype_and_ignores_rows_past_the_slots():
    key, value, k_cache, v_cache, slots = make_store_case(num_tokens=6)
    k_half, v_half = k_cache.half(), v_cache.half()
    expected_k, expected_v = k_half.clone(), v_half.clone()
    reference.store_kv(key, value, expected_k, expected_v, slots[:4])
    store_kv(key, value, k_half, v_half, slots[:4])  # 6 rows, 4 slots: rows 4 and 5 are not stored
    assert torch.equal(k_half, expected_k) and torch.equal(v_half, expected_v)


def test_all_slots_negative_writes_nothing():
    key, value, k_cache, v_cache, _ = make_store_case(num_tokens=3)
    before = k_cache.clone()
    store_kv(key, value, k_cache, v_cache, torch.full((3,), -1, dtype=torch.long, device=DEVICE))
    assert torch.equal(k_cache, before)


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda c: {"key": c["key"][:, :1]}, "key must be"),
        (lambda c: {"value": c["value"][..., :8]}, "value must be"),
        (lambda c: {"v_cache": c["v_cache"][:2]}, "k_cache and v_cache must both be"),
        (lambda c: {"slot_mapping": c["slot_mapping"].float()}, "slot_mapping must be a 1-D int64"),
        (lambda c: {"slot_mapping": torch.zeros(9, dtype=torch.long, device=DEVICE)}, "slot_mapping has 9"),
        (lambda c: {"key": c["key"].int()}, "key dtype torch.int32 is not supported"),
        (lambda c: {"k_cache": c["k_cache"].transpose(2, 3).contiguous().transpose(2, 3)}, "k_cache must be contig"),
    ],
)
def test_bad_inputs_raise_value_error(change, message):
    key, value, k_cache, v_cache, slots = make_store_case()
    args = dict(key=key, value=value, k_cache=k_cache, v_cache=v_cache, slot_mapping=slots)
    args.update(change(args))
    with pytest.raises(ValueError, match=message):
        store_kv(**args)
