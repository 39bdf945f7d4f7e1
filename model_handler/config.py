"""EngineConfig: every engine setting, read once from the environment by `EngineConfig.from_env`.

The variables are declared in `model_handler/envs.py` (names, types, defaults, meanings); this module resolves
the ones whose default depends on the device or the model, and checks how they combine.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from model_handler import envs
from model_handler.model_config import ModelConfig
from model_handler.startup_progress import StartupPhases

DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
}
# On CPU a step's prefill is compute-bound: small chunks let the first requests of a burst start streaming
# sooner, at no cost in throughput.
DEFAULT_MAX_PREFILL_TOKENS = {"cpu": 512, "cuda": 8192}
DEFAULT_MAX_NUM_SEQS = {"cpu": 64, "cuda": 256}


@dataclass(slots=True)
class EngineConfig:
    """Resolved engine settings; built by `from_env`, or directly in tests."""

    model_dir: Path
    model_id: str = ""
    device: str = "cpu"
    dtype: str = "float32"
    max_model_len: int | None = None
    """Prompt + generated tokens of one request (MAX_TOTAL_TOKENS); None: sized at start-up, once the KV cache
    is, as the smaller of the model's limit and what the cache holds (`context_limits.py`)."""
    max_input_tokens: int | None = None
    """Longest prompt (MAX_INPUT_TOKENS); None: the resolved max_model_len - 1."""
    max_num_prefill_tokens: int = 2048
    """Prompt tokens one step may compute (MAX_BATCH_PREFILL_TOKENS, as TGI counts it); the running
    sequences' decodes come on top (see max_step_tokens)."""
    max_num_seqs: int = 64
    block_size: int = 16
    kv_cache_cpu_bytes: int = envs.BY_NAME["KV_CACHE_CPU_BYTES"].default
    cuda_memory_fraction: float = 0.9
    cuda_graph_sizes: list[int] = field(default_factory=list)
    """Decode batch sizes captured as CUDA graphs; empty = eager (always on CPU)."""
    enable_prefix_caching: bool = True
    attention_backend: str | None = None
    tensor_parallel_size: int = 1
    seed: int = 0
    progress_interval_s: float = envs.BY_NAME["STARTUP_PROGRESS_SECONDS"].default
    """Seconds between the log lines that report the weight loading's progress (STARTUP_PROGRESS_SECONDS)."""
    cpu_threads: int | None = None
    """torch threads of the engine process (ENGINE_CPU_THREADS); None keeps torch's default."""
    generation_config: str = "auto"
    """Where the model's sampling defaults come from (GENERATION_CONFIG): `auto` (the model folder's
    generation_config.json), `none`, or a folder; see generation_defaults.py."""
    async_scheduling: bool = False
    """Launch the next step before reading this one's tokens (ASYNC_SCHEDULING, one rank only), so the
    host's bookkeeping overlaps the GPU's work. On by default on one GPU; off on CPU, where every op already
    waits for the one before it."""
    model_config: ModelConfig | None = field(default=None, repr=False, compare=False)
    """The folder's config, read once by `from_env` and shared by the engine, the runner and the TP ranks;
    None (a config built by hand) means read it when needed."""

    @property
    def max_step_tokens(self) -> int:
        """The most rows one step's forward can have: the prompt budget plus a decode for every other sequence."""
        return self.max_num_prefill_tokens + self.max_num_seqs - 1

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def model(self) -> ModelConfig:
        """The model folder's config, read on first use when `from_env` did not."""
        if self.model_config is None:
            self.model_config = ModelConfig.from_model_dir(self.model_dir)
        return self.model_config

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str], device: str | None = None, phases: StartupPhases | None = None
    ) -> EngineConfig:
        """Read every engine variable from `environ`; finds the model folder (downloading a Hub model, timed as
        the `download` phase of `phases`) and reads its config.json."""
        from model_handler.cpu_threads import default_num_threads
        from model_handler.model_source import resolve_model_dir

        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        kind = "cuda" if device.startswith("cuda") else "cpu"
        model_dir, model_id = resolve_model_dir(environ, phases)
        model_config = ModelConfig.from_model_dir(model_dir)
        max_model_len, max_input_tokens = _token_limits(environ, model_config)
        max_num_seqs = _default(environ, "MAX_BATCH_SIZE", DEFAULT_MAX_NUM_SEQS[kind])
        block_size = envs.get(environ, "KV_CACHE_BLOCK_SIZE")
        if block_size & (block_size - 1):
            raise ValueError(f"KV_CACHE_BLOCK_SIZE={block_size} must be a power of two no larger than 256")
        fraction = envs.get(environ, "CUDA_MEMORY_FRACTION")
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"CUDA_MEMORY_FRACTION={fraction} must be in (0, 1]")
        tp_size = _tensor_parallel_size(environ, kind)
        _check_quantize(environ)
        envs.get(environ, "HF_MODEL_TRUST_REMOTE_CODE")  # validated only: no remote code is ever run
        async_scheduling = envs.get(environ, "ASYNC_SCHEDULING")
        if tp_size > 1 and async_scheduling:
            raise ValueError("ASYNC_SCHEDULING needs one rank: the other ranks never see the sampled tokens")
        if async_scheduling is None:
            async_scheduling = kind == "cuda" and tp_size == 1
        backend = envs.get(environ, "ATTENTION_BACKEND")
        if backend == "cpu" and kind == "cuda":
            raise ValueError("ATTENTION_BACKEND=cpu runs on the CPU only; this engine runs on CUDA")
        threads = envs.get(environ, "ENGINE_CPU_THREADS")
        return cls(
            model_dir=Path(model_dir),
            model_id=model_id,
            device=device,
            dtype=_dtype(environ, kind),
            max_model_len=max_model_len,
            max_input_tokens=max_input_tokens,
            max_num_prefill_tokens=_default(environ, "MAX_BATCH_PREFILL_TOKENS", DEFAULT_MAX_PREFILL_TOKENS[kind]),
            max_num_seqs=max_num_seqs,
            block_size=block_size,
            kv_cache_cpu_bytes=envs.get(environ, "KV_CACHE_CPU_BYTES"),
            cuda_memory_fraction=fraction,
            cuda_graph_sizes=_graph_sizes(environ, max_num_seqs) if kind == "cuda" else [],
            enable_prefix_caching=envs.get(environ, "PREFIX_CACHING"),
            attention_backend=backend,
            tensor_parallel_size=tp_size,
            seed=envs.get(environ, "SEED"),
            progress_interval_s=envs.get(environ, "STARTUP_PROGRESS_SECONDS"),
            cpu_threads=threads if threads is not None else default_num_threads(kind),
            async_scheduling=async_scheduling,
            generation_config=envs.get(environ, "GENERATION_CONFIG"),
            model_config=model_config,
        )


def _default(environ: Mapping[str, str], name: str, default: int) -> int:
    """A variable whose declared default is None because it depends on the device."""
    value = envs.get(environ, name)
    return default if value is None else value


def _token_limits(environ: Mapping[str, str], model_config: ModelConfig) -> tuple[int | None, int | None]:
    """(MAX_TOTAL_TOKENS, MAX_INPUT_TOKENS or its older name MAX_INPUT_LENGTH) as given, checked against the
    model and each other now, before the weights load; what the KV cache holds is checked once it is sized."""
    max_pos = int(model_config.max_position_embeddings)
    total = envs.get(environ, "MAX_TOTAL_TOKENS")
    if total is not None and total > max_pos:
        raise ValueError(f"MAX_TOTAL_TOKENS={total} is larger than the model's max_position_embeddings ({max_pos})")
    if envs.is_set(environ, "MAX_INPUT_TOKENS") and envs.is_set(environ, "MAX_INPUT_LENGTH"):
        raise ValueError("MAX_INPUT_TOKENS and MAX_INPUT_LENGTH are aliases: set only one of them")
    input_name = envs.first_set(environ, "MAX_INPUT_TOKENS", "MAX_INPUT_LENGTH") or "MAX_INPUT_TOKENS"
    max_input = envs.get(environ, input_name)
    limit, source = (
        (total, "MAX_TOTAL_TOKENS") if total is not None else (max_pos, "the model's max_position_embeddings")
    )
    if max_input is not None and max_input >= limit:
        raise ValueError(
            f"{input_name}={max_input} must be smaller than the total token limit {limit} ({source}): the prompt "
            "needs room for at least one new token"
        )
    return total, max_input


def default_graph_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 8 up to the largest batch (which is always included)."""
    sizes = [s for s in (1, 2, 4) if s < max_num_seqs] + list(range(8, max_num_seqs + 1, 8))
    if not sizes or sizes[-1] != max_num_seqs:
        sizes.append(max_num_seqs)
    return sizes


def _graph_sizes(environ: Mapping[str, str], max_num_seqs: int) -> list[int]:
    sizes = envs.get(environ, "CUDA_GRAPHS")
    if sizes is None:
        return default_graph_sizes(max_num_seqs)
    if not sizes:
        return []
    # Sizes above the largest batch would never replay.
    return [s for s in sizes if s <= max_num_seqs] or [max_num_seqs]


def _tensor_parallel_size(environ: Mapping[str, str], kind: str) -> int:
    """SM_NUM_GPUS (SageMaker's name; 0 means unset), else NUM_SHARD (TGI's); one rank per GPU on CUDA.

    The GPU count is checked where CUDA is present (a config for CUDA can be built on a CPU machine)."""
    tp_size = envs.get(environ, "SM_NUM_GPUS") or envs.get(environ, "NUM_SHARD") or 1
    if kind == "cuda" and tp_size > 1 and torch.cuda.is_available():
        num_gpus = torch.cuda.device_count()
        if tp_size > num_gpus:
            name = "SM_NUM_GPUS" if envs.get(environ, "SM_NUM_GPUS") else "NUM_SHARD"
            raise ValueError(
                f"{name}={tp_size} asks for {tp_size} tensor-parallel ranks, one per GPU, but {num_gpus} "
                "CUDA device(s) are visible; set it to the instance's GPU count (4 on ml.g5.12xlarge) or fewer"
            )
    return tp_size


def _check_quantize(environ: Mapping[str, str]) -> None:
    """TGI's HF_MODEL_QUANTIZE (QUANTIZE): no quantized path exists yet, so say so instead of serving full precision."""
    for name in ("HF_MODEL_QUANTIZE", "QUANTIZE"):
        value = envs.get(environ, name)
        if value is not None:
            raise ValueError(
                f"{name}={value!r} is not supported: this container serves unquantized weights only "
                f"(float16/bfloat16/float32 via DTYPE); unset {name}"
            )


def _dtype(environ: Mapping[str, str], kind: str) -> str:
    name = envs.get(environ, "DTYPE")
    if name != "auto":
        return name
    if kind != "cuda":
        from model_handler.cpu_features import has_native_bf16

        return auto_cpu_dtype(has_native_bf16())
    # bf16 needs Ampere or newer; older cards (T4 on ml.g4dn, V100) get fp16.
    has_bf16 = not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] >= 8
    return "bfloat16" if has_bf16 else "float16"


def auto_cpu_dtype(native_bf16: bool) -> str:
    """DTYPE=auto on CPU: bf16 where the CPU computes it natively, as vLLM runs fp32 checkpoints in half
    precision and as this engine already does on GPUs (faster matmuls, half the weight and KV bytes); fp32
    elsewhere, where bf16 would be emulated and slower."""
    return "bfloat16" if native_bf16 else "float32"
