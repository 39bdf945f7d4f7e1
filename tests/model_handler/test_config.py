"""EngineConfig.from_env and the model source order, on a config-only model folder (no weights needed)."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import LlamaConfig

from model_handler.config import DTYPES, EngineConfig, auto_cpu_dtype, default_graph_sizes
from model_handler.cpu_features import has_native_bf16


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg-model")
    LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        eos_token_id=2,
    ).save_pretrained(path)
    return path


def from_env(model_dir: Path, device: str = "cpu", **env: str) -> EngineConfig:
    return EngineConfig.from_env({"HF_MODEL_ID": str(model_dir), **env}, device=device)


def test_auto_dtype_on_cpu_is_bf16_only_where_the_cpu_computes_it_natively():
    assert auto_cpu_dtype(True) == "bfloat16"
    assert auto_cpu_dtype(False) == "float32"
    assert isinstance(has_native_bf16(), bool)


def test_explicit_dtype_wins_over_auto_on_cpu(model_dir):
    assert from_env(model_dir, DTYPE="float32").dtype == "float32"
    assert from_env(model_dir, DTYPE="bfloat16").dtype == "bfloat16"


def test_cpu_defaults(model_dir):
    config = from_env(model_dir)
    assert config.model_dir == model_dir and config.model_id == str(model_dir)
    assert config.dtype == auto_cpu_dtype(has_native_bf16())
    assert config.torch_dtype is DTYPES[config.dtype]
    assert config.max_model_len is None  # sized by the engine once the KV cache is (test_context_limits.py)
    assert config.max_num_prefill_tokens == 512
    assert config.max_num_seqs == 64
    assert config.block_size == 16
    assert config.kv_cache_cpu_bytes == 1 << 30
    assert config.cuda_graph_sizes == []
    assert config.enable_prefix_caching is True
    assert config.tensor_parallel_size == 1
    assert config.async_scheduling is False


def test_gpu_defaults_have_a_graph_ladder(model_dir):
    config = from_env(model_dir, device="cuda")
    assert config.async_scheduling is True  # one GPU: the next step is launched before tokens are read
    assert from_env(model_dir, device="cuda", ASYNC_SCHEDULING="false").async_scheduling is False
    assert from_env(model_dir, device="cuda", SM_NUM_GPUS="2").async_scheduling is False  # ranks sync anyway
    assert config.dtype == "bfloat16"
    assert config.max_num_prefill_tokens == 8192 and config.max_num_seqs == 256
    assert config.cuda_graph_sizes[:7] == [1, 2, 4, 8, 16, 24, 32]
    assert config.cuda_graph_sizes[-1] == 256
    assert default_graph_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert default_graph_sizes(1) == [1]


def test_every_variable_is_read(model_dir):
    config = from_env(
        model_dir,
        device="cuda",
        DTYPE="float16",
        MAX_TOTAL_TOKENS="300",
        MAX_BATCH_PREFILL_TOKENS="1000",
        MAX_BATCH_SIZE="12",
        KV_CACHE_BLOCK_SIZE="32",
        KV_CACHE_CPU_BYTES="512MiB",
        CUDA_MEMORY_FRACTION="0.5",
        CUDA_GRAPHS="4,1,2,64",
        PREFIX_CACHING="false",
        ATTENTION_BACKEND="torch",
        SM_NUM_GPUS="2",
        SEED="42",
        ENGINE_CPU_THREADS="3",
        ASYNC_SCHEDULING="false",
    )
    assert config.dtype == "float16" and config.cpu_threads == 3
    assert config.max_model_len == 300
    assert config.max_num_prefill_tokens == 1000 and config.max_num_seqs == 12
    assert config.block_size == 32
    assert config.kv_cache_cpu_bytes == 512 << 20
    assert config.cuda_memory_fraction == 0.5
    assert config.cuda_graph_sizes == [1, 2, 4]  # 64 > MAX_BATCH_SIZE would never replay
    assert config.enable_prefix_caching is False
    assert config.attention_backend == "torch"
    assert config.tensor_parallel_size == 2 and config.seed == 42
    assert config.async_scheduling is False
    assert from_env(model_dir, ASYNC_SCHEDULING="1").async_scheduling is True  # forced on, CPU
    with pytest.raises(ValueError, match="ASYNC_SCHEDULING needs one rank"):
        from_env(model_dir, device="cuda", SM_NUM_GPUS="2", ASYNC_SCHEDULING="true")
    assert from_env(model_dir, device="cuda", CUDA_GRAPHS="0").cuda_graph_sizes == []
    assert from_env(model_dir, NUM_SHARD="4").tensor_parallel_size == 4
    assert from_env(model_dir, DTYPE="bf16").dtype == "bfloat16"
    assert from_env(model_dir, device="cpu", ATTENTION_BACKEND="cpu").attention_backend == "cpu"
    # The prompt budget does not cap the batch (decodes are not charged to it, as in TGI); a step's forward
    # can have the budget plus a decode for every other running sequence.
    small = from_env(model_dir, MAX_BATCH_PREFILL_TOKENS="16", MAX_BATCH_SIZE="32")
    assert (small.max_num_prefill_tokens, small.max_num_seqs, small.max_step_tokens) == (16, 32, 47)


def test_token_limits_are_read_as_given_and_checked_against_the_model_before_loading(model_dir):
    """Unset limits stay unset here: the engine sizes them from the KV cache (test_context_limits.py)."""
    config = from_env(model_dir)
    assert (config.max_model_len, config.max_input_tokens) == (None, None)
    config = from_env(model_dir, MAX_TOTAL_TOKENS="300")
    assert (config.max_model_len, config.max_input_tokens) == (300, None)
    config = from_env(model_dir, MAX_INPUT_TOKENS="100")
    assert (config.max_model_len, config.max_input_tokens) == (None, 100)
    assert from_env(model_dir, MAX_INPUT_LENGTH="100").max_input_tokens == 100  # TGI's older name
    with pytest.raises(ValueError, match="MAX_INPUT_TOKENS and MAX_INPUT_LENGTH"):
        from_env(model_dir, MAX_INPUT_LENGTH="100", MAX_INPUT_TOKENS="100")
    with pytest.raises(ValueError, match="MAX_INPUT_TOKENS=300 must be smaller"):
        from_env(model_dir, MAX_INPUT_TOKENS="300", MAX_TOTAL_TOKENS="300")
    with pytest.raises(ValueError, match="MAX_INPUT_LENGTH=600 must be smaller than the total token limit 512"):
        from_env(model_dir, MAX_INPUT_LENGTH="600")  # the model's limit: known before anything loads


@pytest.mark.parametrize(
    "name, value",
    [
        ("MAX_TOTAL_TOKENS", "many"),
        ("MAX_INPUT_TOKENS", "ten"),
        ("MAX_TOTAL_TOKENS", "4096"),  # above max_position_embeddings
        ("MAX_BATCH_PREFILL_TOKENS", "0"),
        ("MAX_BATCH_SIZE", "-1"),
        ("KV_CACHE_BLOCK_SIZE", "12"),
        ("KV_CACHE_CPU_BYTES", "lots"),
        ("CUDA_MEMORY_FRACTION", "1.5"),
        ("CUDA_GRAPHS", "1,two"),
        ("PREFIX_CACHING", "maybe"),
        ("ATTENTION_BACKEND", "flash"),
        ("ATTENTION_BACKEND", "cpu"),  # the C++ CPU kernel on a CUDA engine
        ("DTYPE", "int8"),
        ("SEED", "x"),
        ("HF_MODEL_QUANTIZE", "bitsandbytes"),
        ("HF_MODEL_QUANTIZE", "awq"),
        ("HF_MODEL_TRUST_REMOTE_CODE", "perhaps"),
        ("ENGINE_CPU_THREADS", "0"),
        ("ASYNC_SCHEDULING", "sometimes"),
    ],
)
def test_bad_values_name_the_variable(model_dir, name, value):
    with pytest.raises(ValueError, match=name):
        from_env(model_dir, device="cuda", **{name: value})


def test_sagemaker_sdk_variables_are_accepted(model_dir):
    config = from_env(
        model_dir,
        device="cpu",
        HF_MODEL_TRUST_REMOTE_CODE="true",
        HF_MODEL_QUANTIZE="",
        SAGEMAKER_PROGRAM="",
        SAGEMAKER_SUBMIT_DIRECTORY="",
        SAGEMAKER_REGION="us-east-1",
        SAGEMAKER_CONTAINER_LOG_LEVEL="20",
    )
    assert config.model_dir == model_dir


def test_sagemaker_model_dir_is_used_when_it_holds_a_model(model_dir, tmp_path):
    config = EngineConfig.from_env({"SM_MODEL_DIR": str(model_dir)}, device="cpu")
    assert config.model_dir == model_dir
    # HF_MODEL_ID wins over /opt/ml/model.
    other = tmp_path / "other"
    LlamaConfig(max_position_embeddings=64, num_hidden_layers=1).save_pretrained(other)
    config = EngineConfig.from_env({"SM_MODEL_DIR": str(model_dir), "HF_MODEL_ID": str(other)}, device="cpu")
    assert config.model_dir == other and config.model().max_position_embeddings == 64


def test_missing_local_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="HF_MODEL_ID"):
        EngineConfig.from_env({"HF_MODEL_ID": str(tmp_path / "nope")}, device="cpu")
    with pytest.raises(ValueError, match="config.json"):
        EngineConfig.from_env({"HF_MODEL_ID": str(tmp_path)}, device="cpu")


def test_hub_id_offline_is_a_clear_error_without_network(tmp_path):
    environ = {"HF_MODEL_ID": "some-org/some-model", "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path)}
    with pytest.raises(ValueError, match="HF_MODEL_ID='some-org/some-model'.*offline"):
        EngineConfig.from_env(environ, device="cpu")


def test_embedded_tiny_model_is_the_last_resort_outside_sagemaker(tiny_model_dir, tmp_path, caplog):
    """`make serve` and a bare `docker run IMAGE serve`: the demo model, and the log says so. A developer on
    SageMaker Studio (other SAGEMAKER_* names set) is not taken for an endpoint."""
    environ = {
        "SM_MODEL_DIR": str(tmp_path),
        "TINY_MODEL_CACHE": str(tiny_model_dir.parent),
        "SAGEMAKER_SPACE_NAME": "studio",
        "SAGEMAKER_CONTAINER_LOG_LEVEL": "20",
    }
    with caplog.at_level("WARNING", logger="model_handler.model_source"):
        config = EngineConfig.from_env(environ, device="cpu")  # an empty /opt/ml/model
    assert config.model_dir == tiny_model_dir and config.model_id == "tiny-llama"
    assert config.model().max_position_embeddings == 2048
    assert "embedded tiny demo model" in caplog.text and "set HF_MODEL_ID" in caplog.text


@pytest.mark.parametrize("name", ["SAGEMAKER_PROGRAM", "SAGEMAKER_SUBMIT_DIRECTORY", "SAGEMAKER_REGION"])
def test_no_model_on_sagemaker_stops_startup_naming_both_ways_to_give_one(tmp_path, name):
    """What the SageMaker SDK sends (two of them empty) marks an endpoint: never the demo model there."""
    environ = {"SM_MODEL_DIR": str(tmp_path), name: "", "SAGEMAKER_CONTAINER_LOG_LEVEL": "20"}
    with pytest.raises(ValueError, match=rf"no model to serve.*{name} is set.*HF_MODEL_ID.*{tmp_path}") as caught:
        EngineConfig.from_env(environ, device="cpu")
    assert "HF_TOKEN" in str(caught.value) and "model_data" in str(caught.value)


def test_sagemaker_evidence_reads_the_sdk_variables_and_the_model_mount(tmp_path):
    from model_handler.model_source import sagemaker_evidence

    assert sagemaker_evidence({}, tmp_path) is None
    assert sagemaker_evidence({"SAGEMAKER_REGION": "us-east-1"}, tmp_path).startswith("SAGEMAKER_REGION is set")
    # Some mount point every Linux machine has stands in for the volume SageMaker mounts at /opt/ml/model.
    mount = next(p for p in (Path("/proc"), Path("/sys"), Path("/dev")) if p.is_mount())
    assert "is a mount point" in sagemaker_evidence({}, mount)
