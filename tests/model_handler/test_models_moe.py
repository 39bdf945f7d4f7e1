"""The MoE families (Mixtral, Qwen2-MoE, Qwen3-MoE) against transformers' own forward over a paged cache, and
the loading of their stacked experts from the checkpoint's per-expert tensors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from model_handler.kernels import TorchReferenceBackend, select_backend
from model_handler.layers.moe import SparseMoeBlock
from model_handler.model_config import ModelConfig
from model_handler.model_loader import load_model
from model_handler.models.llama import LlamaMLP
from tests.model_handler.model_factories import PagedBatches, make_kv_caches, save_random_model
from tests.model_handler.moe_factories import MOE_FAMILIES, moe_config
from tests.model_handler.test_models import assert_matches_hf_over_paged_steps, load_fp32
from tests.model_handler.test_weights import rewrite_checkpoint


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_logits_match_transformers_over_paged_steps(family, tmp_path):
    """A mixed prefill of four prompts, then chunks and decodes: every new token's logits within 1e-4."""
    hf_model = save_random_model(moe_config(family), tmp_path)
    assert_matches_hf_over_paged_steps(load_fp32(tmp_path), hf_model)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_triton_backend_runs_the_fused_moe_kernel_and_matches_transformers(family, tmp_path):
    """With the Triton backend (interpreted here) the experts run in the fused grouped-GEMM kernel."""
    hf_model = save_random_model(moe_config(family), tmp_path)
    backend = select_backend(torch.device("cpu"), "triton")
    model = load_model(tmp_path, dtype=torch.float32, device=torch.device("cpu"), attention_backend=backend)
    blocks = [layer.mlp for layer in model.model.layers if isinstance(layer.mlp, SparseMoeBlock)]
    assert blocks and all(block.experts.use_triton for block in blocks)
    assert_matches_hf_over_paged_steps(model, hf_model, num_steps=2)  # the interpreter is slow: prefill + mixed


def test_top1_routing_matches_transformers(tmp_path):
    hf_model = save_random_model(moe_config("mixtral", num_experts_per_tok=1), tmp_path)
    assert_matches_hf_over_paged_steps(load_fp32(tmp_path), hf_model, num_steps=2)


def test_layers_get_the_mlp_transformers_gives_them(tmp_path):
    save_random_model(moe_config("qwen2_moe"), tmp_path / "qwen2")  # mlp_only_layers [1]
    save_random_model(moe_config("qwen3_moe"), tmp_path / "qwen3")  # decoder_sparse_step 2
    qwen2, qwen3 = load_fp32(tmp_path / "qwen2"), load_fp32(tmp_path / "qwen3")
    assert [type(layer.mlp) for layer in qwen2.model.layers] == [SparseMoeBlock, LlamaMLP, SparseMoeBlock]
    assert [type(layer.mlp) for layer in qwen3.model.layers] == [LlamaMLP, SparseMoeBlock, LlamaMLP]
    sparse = qwen2.model.layers[0].mlp
    assert sparse.shared_expert is not None and sparse.shared_expert_gate is not None and not sparse.renormalize
    assert qwen3.model.layers[1].mlp.shared_expert is None and qwen3.model.layers[1].mlp.renormalize
    assert not sparse.experts.use_triton  # the torch backend: the experts loop


@pytest.mark.parametrize(
    ("family", "prefix", "names"),
    [
        ("mixtral", "model.layers.1.block_sparse_moe.experts", ("w1", "w3", "w2")),
        ("qwen2_moe", "model.layers.2.mlp.experts", ("gate_proj", "up_proj", "down_proj")),
    ],
)
def test_experts_are_stacked_from_the_checkpoint_tensors(family, prefix, names, tmp_path):
    save_random_model(moe_config(family), tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    layer = int(prefix.split(".")[2])
    experts = load_fp32(tmp_path).model.layers[layer].mlp.experts
    gate, up, down = names
    for e in range(experts.num_experts):
        expected_w13 = torch.cat([tensors[f"{prefix}.{e}.{gate}.weight"], tensors[f"{prefix}.{e}.{up}.weight"]])
        torch.testing.assert_close(experts.w13_weight[e], expected_w13, atol=0, rtol=0)
        torch.testing.assert_close(experts.w2_weight[e], tensors[f"{prefix}.{e}.{down}.weight"], atol=0, rtol=0)


def test_missing_expert_weight_is_named_as_in_the_checkpoint(tmp_path):
    save_random_model(moe_config("mixtral"), tmp_path)
    rewrite_checkpoint(tmp_path, lambda t: t.pop("model.layers.0.block_sparse_moe.experts.2.w3.weight"))
    with pytest.raises(
        ValueError, match=r"missing weights: model\.layers\.0\.block_sparse_moe\.experts\.2\.w3\.weight"
    ):
        load_fp32(tmp_path)


def test_checkpoint_with_more_experts_than_the_config_is_refused(tmp_path):
    save_random_model(moe_config("qwen3_moe"), tmp_path)
    name = "model.layers.1.mlp.experts.0.down_proj.weight"
    rewrite_checkpoint(tmp_path, lambda t: t.__setitem__(name.replace(".0.", ".6."), t[name].clone()))
    with pytest.raises(ValueError, match=r"experts\.6\.down_proj\.weight.*expert below 6"):
        load_fp32(tmp_path)


def test_expert_of_the_wrong_shape_is_refused(tmp_path):
    save_random_model(moe_config("qwen2_moe"), tmp_path)
    name = "model.layers.0.mlp.experts.1.up_proj.weight"
    rewrite_checkpoint(tmp_path, lambda t: t.__setitem__(name, t[name][:16].clone()))
    with pytest.raises(ValueError, match=r"up_proj\.weight.*shape \(16, 64\), expected \(32, 64\)"):
        load_fp32(tmp_path)


def test_experts_with_another_activation_are_refused(tmp_path):
    save_random_model(moe_config("mixtral", hidden_act="gelu"), tmp_path)
    with pytest.raises(ValueError, match="hidden_act 'gelu'"):
        load_fp32(tmp_path)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_model_config_names_the_architecture(family, tmp_path):
    moe_config(family).save_pretrained(tmp_path)
    config = ModelConfig.from_model_dir(tmp_path)
    assert config.architecture == type(moe_config(family)).__name__.replace("Config", "ForCausalLM")
    assert config.max_position_embeddings == 256  # no window in these configs: the whole context


def test_bfloat16_stays_close_to_float32(tmp_path):
    save_random_model(moe_config("qwen2_moe"), tmp_path)
    reference = load_fp32(tmp_path)
    model = load_model(
        tmp_path, dtype=torch.bfloat16, device=torch.device("cpu"), attention_backend=TorchReferenceBackend()
    )
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    results = []
    for m, dtype in ((reference, torch.float32), (model, torch.bfloat16)):
        caches = make_kv_caches(m.config.num_layers, 8, 16, m.num_kv_heads_per_rank, m.config.head_dim, dtype)
        input_ids, positions, metadata = PagedBatches(16, 8).step([list(range(10, 40))])
        with torch.inference_mode():
            results.append(m.compute_logits(m(input_ids, positions, caches, metadata)))
    fp32, bf16 = results
    # bf16 keeps ~3 significant digits and may send a near-tied token to another expert: compare the typical
    # error to the logits' spread, and the argmax.
    assert (bf16 - fp32).abs().mean() < 0.05 * fp32.std()
    assert (bf16.argmax(-1) == fp32.argmax(-1)).float().mean() >= 0.9
