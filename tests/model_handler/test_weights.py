"""Safetensors loading: sharded equals unsharded, and a checkpoint that does not fit says what is wrong."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

from model_handler.kernels import TorchReferenceBackend
from model_handler.model_loader import load_model
from model_handler.startup_progress import ByteProgress
from model_handler.weights import checkpoint_bytes, checkpoint_files
from tests.model_handler.model_factories import family_config, save_random_model


def load_fp32(model_dir):
    return load_model(
        model_dir, dtype=torch.float32, device=torch.device("cpu"), attention_backend=TorchReferenceBackend()
    )


def test_loading_reports_bytes_done_of_the_checkpoint_on_disk(tmp_path, caplog):
    """The weight loading's progress (a start-up phase): every file's bytes, headers included, counted once."""
    hf_model = save_random_model(family_config("qwen2"), tmp_path / "single")
    hf_model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    total = checkpoint_bytes(tmp_path / "sharded")
    assert total == sum(path.stat().st_size for path in checkpoint_files(tmp_path / "sharded"))
    with caplog.at_level(logging.INFO, logger="model_handler.startup"):
        progress = ByteProgress("load", "loading weights", total, interval_s=0.0)
        load_model(
            tmp_path / "sharded",
            dtype=torch.float32,
            device=torch.device("cpu"),
            attention_backend=TorchReferenceBackend(),
            progress=progress,
        )
        assert progress.bytes_done == total  # before close(), which would set it anyway
        progress.close()
    done = [r.bytes_done for r in caplog.records if getattr(r, "phase", None) == "load"]
    assert done[0] == 0 and done[-1] == total and len(done) > 3 and done == sorted(done)


def rewrite_checkpoint(model_dir, edit) -> None:
    """Apply `edit` to the single-file checkpoint's {name: tensor} dict and save it back."""
    path = model_dir / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_sharded_checkpoint_loads_the_same_as_unsharded(tmp_path):
    hf_model = save_random_model(family_config("qwen2"), tmp_path / "single")
    hf_model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(checkpoint_files(tmp_path / "sharded")) > 2
    single, sharded = load_fp32(tmp_path / "single"), load_fp32(tmp_path / "sharded")
    single_params = dict(single.named_parameters())
    for name, param in sharded.named_parameters():
        torch.testing.assert_close(param, single_params[name], atol=0, rtol=0)


def test_fused_projections_hold_the_hf_tensors_in_order(tmp_path):
    save_random_model(family_config("qwen2"), tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    model = load_fp32(tmp_path)
    attn, mlp = model.model.layers[1].self_attn, model.model.layers[1].mlp
    prefix = "model.layers.1."
    for suffix in ("weight", "bias"):
        expected = torch.cat([tensors[f"{prefix}self_attn.{p}_proj.{suffix}"] for p in "qkv"])
        torch.testing.assert_close(getattr(attn.qkv_proj, suffix), expected, atol=0, rtol=0)
    expected = torch.cat([tensors[prefix + "mlp.gate_proj.weight"], tensors[prefix + "mlp.up_proj.weight"]])
    torch.testing.assert_close(mlp.gate_up_proj.weight, expected, atol=0, rtol=0)


def test_weights_are_converted_to_the_requested_dtype(tmp_path):
    save_random_model(family_config("llama_gqa"), tmp_path)
    model = load_model(
        tmp_path, dtype=torch.float16, device=torch.device("cpu"), attention_backend=TorchReferenceBackend()
    )
    tensors = load_file(tmp_path / "model.safetensors")
    assert model.lm_head.weight.dtype == torch.float16
    torch.testing.assert_close(model.lm_head.weight, tensors["lm_head.weight"].half(), atol=0, rtol=0)


def test_tied_embeddings_share_one_parameter_even_if_lm_head_is_saved(tmp_path):
    save_random_model(family_config("qwen2"), tmp_path)  # tied
    rewrite_checkpoint(tmp_path, lambda t: t.__setitem__("lm_head.weight", t["model.embed_tokens.weight"].clone()))
    model = load_fp32(tmp_path)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_missing_weight_is_named(tmp_path):
    save_random_model(family_config("llama_gqa"), tmp_path)
    rewrite_checkpoint(tmp_path, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(ValueError, match=r"missing weights: model\.layers\.1\.self_attn\.k_proj\.weight"):
        load_fp32(tmp_path)


def test_untied_model_without_lm_head_is_an_error(tmp_path):
    save_random_model(family_config("llama_gqa"), tmp_path)
    rewrite_checkpoint(tmp_path, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(ValueError, match="missing weights: lm_head.weight"):
        load_fp32(tmp_path)


def test_unexpected_weight_is_named(tmp_path):
    save_random_model(family_config("llama_gqa"), tmp_path)
    rewrite_checkpoint(tmp_path, lambda t: t.__setitem__("model.layers.0.mlp.extra_proj.weight", torch.zeros(2)))
    with pytest.raises(ValueError, match=r"does not use: model\.layers\.0\.mlp\.extra_proj\.weight"):
        load_fp32(tmp_path)


def test_old_rope_buffers_in_a_checkpoint_are_ignored(tmp_path):
    save_random_model(family_config("llama_gqa"), tmp_path)
    expected = load_fp32(tmp_path).state_dict()
    rewrite_checkpoint(tmp_path, lambda t: t.__setitem__("model.layers.0.self_attn.rotary_emb.inv_freq", torch.ones(8)))
    loaded = load_fp32(tmp_path).state_dict()  # no error for the stale buffer, and nothing else changes
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[name], expected[name]) for name in expected)


def test_shape_mismatch_names_the_weight(tmp_path):
    save_random_model(family_config("llama_gqa"), tmp_path)
    rewrite_checkpoint(tmp_path, lambda t: t.__setitem__("model.norm.weight", torch.ones(3)))
    with pytest.raises(ValueError, match=r"'model\.norm\.weight'.*shape \(3,\), expected \(64,\)"):
        load_fp32(tmp_path)


def test_folder_without_safetensors_is_explained(tmp_path):
    save_random_model(family_config("llama_gqa"), tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="no safetensors weights"):
        load_fp32(tmp_path)


def test_index_naming_an_absent_shard_is_explained(tmp_path):
    hf_model = save_random_model(family_config("llama_gqa"), tmp_path / "single")
    hf_model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[0]
    (tmp_path / "sharded" / victim).unlink()
    with pytest.raises(ValueError, match=f"absent: {victim}"):
        load_fp32(tmp_path / "sharded")
