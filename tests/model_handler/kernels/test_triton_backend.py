"""`TritonBackend` behind the `AttentionBackend` protocol: same results as the torch backend."""

from __future__ import annotations

import torch

from model_handler.kernels import TorchReferenceBackend, select_backend
from model_handler.kernels.triton_backend import TritonBackend


def test_select_backend_by_name_gives_the_triton_backend():
    backend = select_backend(torch.device("cpu"), "triton")
    assert isinstance(backend, TritonBackend)
    assert backend.name == "triton"


def test_store_and_attention_match_the_torch_backend(paged_batch):
    """One mixed step through both backends: store this step's k/v, then attend."""
    batch = paged_batch([1, 7, 1], [33, 7, 18], num_heads=8, num_kv_heads=2, block_size=8, seed=2)
    num_tokens = batch.query.shape[0]
    key = torch.randn(num_tokens, 2, 32, device=batch.query.device)  # [num_tokens, num_kv_heads, head_dim]
    value = torch.randn(num_tokens, 2, 32, device=batch.query.device)
    results = []
    for backend in (TritonBackend(num_splits=2), TorchReferenceBackend()):
        k_cache, v_cache = batch.k_cache.clone(), batch.v_cache.clone()
        backend.store_kv(key, value, k_cache, v_cache, batch.slot_mapping)
        out = backend.attention(batch.query, k_cache, v_cache, batch.metadata(), 0.25)
        results.append((k_cache, v_cache, out))
    (tk, tv, tout), (rk, rv, rout) = results
    assert torch.equal(tk, rk) and torch.equal(tv, rv)
    assert (tout - rout).abs().max().item() < 2e-5


def test_attention_writes_into_the_given_out_buffer(paged_batch):
    batch = paged_batch([1, 1], [9, 40])
    out = torch.full_like(batch.query, float("nan"))
    returned = TritonBackend().attention(batch.query, batch.k_cache, batch.v_cache, batch.metadata(), 0.5, out=out)
    assert returned is out
    assert torch.isfinite(out).all()
