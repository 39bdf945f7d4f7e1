"""EngineConfig: every engine setting, read once from the environment by `EngineConfig.from_env`.

TGI's and SageMaker's variable names; a bad value raises ValueError naming the variable.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
}
DTYPE_ALIASES = {"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32", "float": "float32"}
# Without MAX_TOTAL_TOKENS the context is the model's, capped so block tables and graphs stay small.
DEFAULT_MAX_MODEL_LEN_CAP = {"cpu": 4096, "cuda": 8192}
# On CPU a step's prefill is compute-bound (~20k tokens/s on 2 cores for the tiny model): small chunks let the
# first requests of a burst start streaming sooner at no cost in throughput (bench: TTFT p50 at 32 streams
# 250 -> 120-150 ms going from 2048 to 512).
DEFAULT_MAX_PREFILL_TOKENS = {"cpu": 512, "cuda": 8192}
DEFAULT_MAX_NUM_SEQS = {"cpu": 64, "cuda": 256}
DEFAULT_KV_CACHE_CPU_BYTES = 1 << 30
_BYTE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


@dataclass(slots=True)
class EngineConfig:
    """Resolved engine settings; built by `from_env`, or directly in tests."""

    model_dir: Path
    model_id: str = ""
    device: str = "cpu"
    dtype: str = "float32"
    max_model_len: int = 2048
    max_num_prefill_tokens: int = 2048
    """Prompt tokens one step may compute (MAX_BATCH_PREFILL_TOKENS, as TGI counts it); the running
    sequences' decodes come on top (see max_step_tokens)."""
    max_num_seqs: int = 64
    block_size: int = 16
    kv_cache_cpu_bytes: int = DEFAULT_KV_CACHE_CPU_BYTES
    cuda_memory_fraction: float = 0.9
    cuda_graph_sizes: list[int] = field(default_factory=list)
    """Decode batch sizes captured as CUDA graphs; empty = eager (always on CPU)."""
    enable_prefix_caching: bool = True
    attention_backend: str | None = None
    tensor_parallel_size: int = 1
    seed: int = 0
    cpu_threads: int | None = None
    """torch threads of the engine process (ENGINE_CPU_THREADS); None keeps torch's default."""
    generation_config: str = "auto"
    """Where the model's sampling defaults come from (GENERATION_CONFIG): `auto` (the model folder's
    generation_config.json), `none`, or a folder; see generation_defaults.py."""
    async_scheduling: bool = False
    """Launch the next step before reading this one's tokens (ASYNC_SCHEDULING, one rank only), so the
    host's bookkeeping overlaps the GPU's work. On by default on one GPU (an H100 measured 4-12% more
    tokens/s, identical tokens); off on CPU, where every op already waits for the one before it."""

    @property
    def max_step_tokens(self) -> int:
        """The most rows one step's forward can have: the prompt budget plus a decode for every other sequence."""
        return self.max_num_prefill_tokens + self.max_num_seqs - 1

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @classmethod
    def from_env(cls, environ: Mapping[str, str], device: str | None = None) -> EngineConfig:
        """Read every engine variable from `environ` (pure apart from reading the model's config.json)."""
        from model_handler.cpu_threads import num_threads_from_env
        from model_handler.generation_defaults import parse_source
        from model_handler.model_config import ModelConfig
        from model_handler.model_source import resolve_model_dir

        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        kind = "cuda" if device.startswith("cuda") else "cpu"
        model_dir, model_id = resolve_model_dir(environ)
        model_config = ModelConfig.from_model_dir(model_dir)

        max_pos = int(model_config.max_position_embeddings)
        max_model_len = _int(environ, "MAX_TOTAL_TOKENS", min(max_pos, DEFAULT_MAX_MODEL_LEN_CAP[kind]), minimum=2)
        if max_model_len > max_pos:
            raise ValueError(
                f"MAX_TOTAL_TOKENS={max_model_len} is larger than the model's max_position_embeddings ({max_pos})"
            )
        max_num_prefill_tokens = _int(environ, "MAX_BATCH_PREFILL_TOKENS", DEFAULT_MAX_PREFILL_TOKENS[kind], minimum=1)
        max_num_seqs = _int(environ, "MAX_BATCH_SIZE", DEFAULT_MAX_NUM_SEQS[kind], minimum=1)
        block_size = _int(environ, "KV_CACHE_BLOCK_SIZE", 16, minimum=1)
        if block_size & (block_size - 1) or block_size > 256:
            raise ValueError(f"KV_CACHE_BLOCK_SIZE={block_size} must be a power of two no larger than 256")
        fraction = _float(environ, "CUDA_MEMORY_FRACTION", 0.9)
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"CUDA_MEMORY_FRACTION={fraction} must be in (0, 1]")
        graphs = _graph_sizes(environ, max_num_seqs) if kind == "cuda" else []
        tp_size = _tensor_parallel_size(environ, kind)
        _check_quantize(environ)
        _bool(environ, "HF_MODEL_TRUST_REMOTE_CODE", False)  # validated only: no remote code is ever run
        if tp_size > 1 and _bool(environ, "ASYNC_SCHEDULING", False):
            raise ValueError("ASYNC_SCHEDULING needs one rank: the other ranks never see the sampled tokens")
        async_scheduling = _bool(environ, "ASYNC_SCHEDULING", kind == "cuda" and tp_size == 1)
        backend = (environ.get("ATTENTION_BACKEND") or "").strip().lower() or None
        if backend not in (None, "torch", "cpu", "triton"):
            raise ValueError(f"ATTENTION_BACKEND={backend!r} must be 'torch', 'cpu' or 'triton'")
        if backend == "cpu" and kind == "cuda":
            raise ValueError("ATTENTION_BACKEND=cpu runs on the CPU only; this engine runs on CUDA")
        return cls(
            model_dir=Path(model_dir),
            model_id=model_id,
            device=device,
            dtype=_dtype(environ, kind),
            max_model_len=max_model_len,
            max_num_prefill_tokens=max_num_prefill_tokens,
            max_num_seqs=max_num_seqs,
            block_size=block_size,
            kv_cache_cpu_bytes=_bytes(environ, "KV_CACHE_CPU_BYTES", DEFAULT_KV_CACHE_CPU_BYTES),
            cuda_memory_fraction=fraction,
            cuda_graph_sizes=graphs,
            enable_prefix_caching=_bool(environ, "PREFIX_CACHING", True),
            attention_backend=backend,
            tensor_parallel_size=tp_size,
            seed=_int(environ, "SEED", 0, minimum=0),
            cpu_threads=num_threads_from_env(environ, kind),
            async_scheduling=async_scheduling,
            generation_config=parse_source(environ.get("GENERATION_CONFIG")),
        )


def default_graph_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 8 up to the largest batch (which is always included)."""
    sizes = [s for s in (1, 2, 4) if s < max_num_seqs] + list(range(8, max_num_seqs + 1, 8))
    if not sizes or sizes[-1] != max_num_seqs:
        sizes.append(max_num_seqs)
    return sizes


def _graph_sizes(environ: Mapping[str, str], max_num_seqs: int) -> list[int]:
    raw = (environ.get("CUDA_GRAPHS") or "").strip()
    if not raw:
        return default_graph_sizes(max_num_seqs)
    try:
        sizes = sorted({int(part) for part in raw.split(",") if part.strip()})
    except ValueError:
        raise ValueError(f"CUDA_GRAPHS={raw!r} must be a comma-separated list of batch sizes, or 0") from None
    if sizes == [0]:
        return []
    if sizes[0] < 1:
        raise ValueError(f"CUDA_GRAPHS={raw!r}: batch sizes must be positive (use 0 alone to disable)")
    # Sizes above the largest batch would never replay.
    return [s for s in sizes if s <= max_num_seqs] or [max_num_seqs]


def _tensor_parallel_size(environ: Mapping[str, str], kind: str) -> int:
    """SM_NUM_GPUS (SageMaker's name; 0 means unset), else NUM_SHARD (TGI's); one rank per GPU on CUDA.

    The GPU count is checked where CUDA is present (a config for CUDA can be built on a CPU machine)."""
    tp_size = _int(environ, "SM_NUM_GPUS", 0, minimum=0) or _int(environ, "NUM_SHARD", 1, minimum=1)
    if kind == "cuda" and tp_size > 1 and torch.cuda.is_available():
        num_gpus = torch.cuda.device_count()
        if tp_size > num_gpus:
            name = "SM_NUM_GPUS" if (environ.get("SM_NUM_GPUS") or "").strip() not in ("", "0") else "NUM_SHARD"
            raise ValueError(
                f"{name}={tp_size} asks for {tp_size} tensor-parallel ranks, one per GPU, but {num_gpus} "
                "CUDA device(s) are visible; set it to the instance's GPU count (4 on ml.g5.12xlarge) or fewer"
            )
    return tp_size


def _check_quantize(environ: Mapping[str, str]) -> None:
    """TGI's HF_MODEL_QUANTIZE (QUANTIZE): no quantized path exists yet, so say so instead of serving full precision."""
    for name in ("HF_MODEL_QUANTIZE", "QUANTIZE"):
        raw = (environ.get(name) or "").strip()
        if raw:
            raise ValueError(
                f"{name}={raw!r} is not supported: this container serves unquantized weights only "
                f"(float16/bfloat16/float32 via DTYPE); unset {name}"
            )


def _dtype(environ: Mapping[str, str], kind: str) -> str:
    raw = (environ.get("DTYPE") or "auto").strip().lower()
    if raw == "auto":
        if kind != "cuda":
            from model_handler.cpu_features import has_native_bf16

            return auto_cpu_dtype(has_native_bf16())
        # bf16 needs Ampere or newer; older cards (T4 on ml.g4dn, V100) get fp16.
        has_bf16 = not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] >= 8
        return "bfloat16" if has_bf16 else "float16"
    name = DTYPE_ALIASES.get(raw, raw)
    if name not in DTYPES:
        raise ValueError(f"DTYPE={raw!r} must be one of auto, float16, bfloat16, float32")
    return name


def auto_cpu_dtype(native_bf16: bool) -> str:
    """DTYPE=auto on CPU: bf16 where the CPU computes it natively, as vLLM runs fp32 checkpoints in half
    precision and as this engine already does on GPUs (matmuls ~2x faster on an AVX512-BF16 EPYC, half the
    weight and KV bytes); fp32 elsewhere, where bf16 would be emulated and slower."""
    return "bfloat16" if native_bf16 else "float32"


def _int(environ: Mapping[str, str], name: str, default: int, minimum: int) -> int:
    raw = (environ.get(name) or "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} must be an integer") from None
    if value < minimum:
        raise ValueError(f"{name}={value} must be at least {minimum}")
    return value


def _float(environ: Mapping[str, str], name: str, default: float) -> float:
    raw = (environ.get(name) or "").strip()
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} must be a number") from None


def _bool(environ: Mapping[str, str], name: str, default: bool) -> bool:
    raw = (environ.get(name) or "").strip().lower()
    if not raw:
        return default
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise ValueError(f"{name}={raw!r} must be true or false")


def _bytes(environ: Mapping[str, str], name: str, default: int) -> int:
    """An integer byte count, optionally with a unit: 512MiB, 2G, 1gb."""
    raw = (environ.get(name) or "").strip()
    if not raw:
        return default
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?", raw.lower())
    if match is None:
        raise ValueError(f"{name}={raw!r} must be a byte count such as 1073741824 or 1GiB")
    value = int(float(match.group(1)) * _BYTE_UNITS[match.group(2)])
    if value <= 0:
        raise ValueError(f"{name}={raw!r} must be positive")
    return value
