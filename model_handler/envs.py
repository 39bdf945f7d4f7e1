"""Every environment variable the container reads, declared once: name, type, default, meaning, which process.

In the manner of vLLM's `envs.py`, and torch-free so the HTTP side imports it too. The two readers
(`EngineConfig.from_env`, `Settings.from_env`) and every other module take their values from here through
`get(environ, name)` (a pure function of a mapping, for tests) or `envs.NAME` (this process's environment); no
other module touches `os.environ`. An empty value counts as unset: SageMaker passes some variables empty. A bad
value raises ValueError naming the variable. `python -m model_handler.envs` prints the README's table.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

Parser = Callable[[str, str], Any]
"""(name, raw text) -> typed value; raises ValueError naming the variable."""

ENGINE, HTTP, LAUNCHER = "engine", "http", "launcher"


def integer(minimum: int | None = None, maximum: int | None = None) -> Parser:
    def parse(name: str, raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(f"{name}={raw!r} must be an integer") from None
        _check_range(name, value, minimum, maximum)
        return value

    return parse


def number(minimum: float | None = None, maximum: float | None = None) -> Parser:
    def parse(name: str, raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"{name}={raw!r} must be a number") from None
        _check_range(name, value, minimum, maximum)
        return value

    return parse


def _check_range(name: str, value: float, minimum: float | None, maximum: float | None) -> None:
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}={value} must be at least {minimum}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name}={value} must be at most {maximum}")


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def boolean(name: str, raw: str) -> bool:
    if raw.lower() in _TRUE:
        return True
    if raw.lower() in _FALSE:
        return False
    raise ValueError(f"{name}={raw!r} must be true or false")


def text(_name: str, raw: str) -> str:
    return raw


def choice(*options: str, aliases: Mapping[str, str] | None = None) -> Parser:
    """One of `options`, case-insensitive; `aliases` map other spellings onto them."""

    def parse(name: str, raw: str) -> str:
        value = raw.lower()
        value = (aliases or {}).get(value, value)
        if value not in options:
            raise ValueError(f"{name}={raw!r} must be one of {', '.join(options)}")
        return value

    return parse


_BYTE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def byte_count(name: str, raw: str) -> int:
    """An integer byte count, optionally with a unit: 512MiB, 2G, 1gb."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?", raw.lower())
    if match is None:
        raise ValueError(f"{name}={raw!r} must be a byte count such as 1073741824 or 1GiB")
    value = int(float(match.group(1)) * _BYTE_UNITS[match.group(2)])
    if value <= 0:
        raise ValueError(f"{name}={raw!r} must be positive")
    return value


def log_level(name: str, raw: str) -> int:
    """A numeric level ("20", what the SageMaker SDK sets) or a name ("info", "WARNING")."""
    if raw.isdigit():
        return int(raw)
    level = logging.getLevelName(raw.upper())
    if isinstance(level, int):
        return level
    raise ValueError(f"{name}={raw!r} must be a log level: a number like 20 or a name like INFO")


def batch_sizes(name: str, raw: str) -> list[int]:
    """A comma-separated list of positive batch sizes, sorted and unique; `0` alone: none."""
    try:
        sizes = sorted({int(part) for part in raw.split(",") if part.strip()})
    except ValueError:
        raise ValueError(f"{name}={raw!r} must be a comma-separated list of batch sizes, or 0") from None
    if sizes == [0]:
        return []
    if not sizes or sizes[0] < 1:
        raise ValueError(f"{name}={raw!r}: batch sizes must be positive (use 0 alone to disable)")
    return sizes


def generation_config(name: str, raw: str) -> str:
    """`auto`, `none` (`vllm` is vLLM's spelling of it) or a folder holding a generation_config.json."""
    if raw.lower() in ("auto", "none", "vllm"):
        return "none" if raw.lower() == "vllm" else raw.lower()
    if not os.path.isfile(os.path.join(raw, "generation_config.json")):
        raise ValueError(
            f"{name}={raw!r} must be auto (the model folder's generation_config.json), none, or a folder holding "
            "a generation_config.json"
        )
    return raw


def origins(_name: str, raw: str) -> tuple[str, ...]:
    return tuple(origin.strip() for origin in raw.split(",") if origin.strip())


@dataclass(frozen=True, slots=True)
class Variable:
    name: str
    parse: Parser
    default: Any
    """The value when unset; None where the reader decides (it depends on the device or the model)."""
    default_doc: str
    """The default as the README's table states it."""
    read_by: str
    """Which processes read it: engine, http (the gunicorn workers), launcher."""
    meaning: str


def _var(name: str, parse: Parser, default: Any, default_doc: str, read_by: str, meaning: str) -> Variable:
    return Variable(name, parse, default, default_doc, read_by, meaning)


VARIABLES: tuple[Variable, ...] = (
    # ---- the model -----------------------------------------------------------------------------------------------
    _var("HF_MODEL_ID", text, None, "–", ENGINE,
         "a local model folder, or a Hugging Face Hub id downloaded at start (needs network; `HF_TOKEN` for gated "
         "models); only the files the engine reads are fetched (config, generation config, tokenizer and chat "
         "template files, `model.safetensors` or the index's shards). Unset with no model in `SM_MODEL_DIR`: the "
         "embedded tiny demo model, but on SageMaker (`SAGEMAKER_PROGRAM`, `SAGEMAKER_SUBMIT_DIRECTORY` or "
         "`SAGEMAKER_REGION` present, or `SM_MODEL_DIR` a mount point) start-up fails"),
    _var("HF_MODEL_REVISION", text, None, "–", ENGINE, "hub revision for `HF_MODEL_ID`"),
    _var("HF_TOKEN", text, None, "–", ENGINE, "hub token"),
    _var("HUGGING_FACE_HUB_TOKEN", text, None, "–", ENGINE, "hub token (older name; `HF_TOKEN` wins)"),
    _var("HF_HUB_OFFLINE", boolean, False, "false", ENGINE, "never contact the hub: `HF_MODEL_ID` must be cached"),
    _var("HF_ENDPOINT", text, None, "`https://huggingface.co`", ENGINE,
         "the Hub's address (a mirror or a private Hub); huggingface_hub reads it too"),
    _var("HUGGINGFACE_HUB_CACHE", text, None, "huggingface_hub's", ENGINE, "hub cache folder"),
    _var("HF_HUB_CACHE", text, None, "huggingface_hub's", ENGINE,
         "hub cache folder (newer name; `HUGGINGFACE_HUB_CACHE` wins)"),
    _var("SM_MODEL_DIR", text, "/opt/ml/model", "`/opt/ml/model`", ENGINE,
         "where SageMaker unpacks `model_data`; used when `HF_MODEL_ID` is unset and it holds a `config.json`"),
    _var("TINY_MODEL_CACHE", text, "~/.cache/sagemaker-llm", "`~/.cache/sagemaker-llm`", ENGINE,
         "where the embedded tiny model is built (used when no model is given)"),
    _var("SM_NUM_GPUS", integer(minimum=0), None, "1", ENGINE, "tensor-parallel degree (0 counts as unset)"),
    _var("NUM_SHARD", integer(minimum=1), None, "1", ENGINE, "tensor-parallel degree (TGI's name; `SM_NUM_GPUS` wins)"),
    _var("HF_MODEL_QUANTIZE", text, None, "–", ENGINE,
         "accepted only when empty: quantization is not supported yet, any value stops start-up with a clear error"),
    _var("QUANTIZE", text, None, "–", ENGINE, "TGI's name for `HF_MODEL_QUANTIZE`; the same rule"),
    _var("HF_MODEL_TRUST_REMOTE_CODE", boolean, False, "false", ENGINE,
         "accepted; no remote code is ever run (only the built-in architectures are served)"),
    _var("DTYPE", choice("auto", "float16", "bfloat16", "float32",
                         aliases={"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32",
                                  "float": "float32"}),
         "auto", "`auto` (bf16 on GPU, fp16 before Ampere; on CPU bf16 with AVX512-BF16/AMX, else fp32)", ENGINE,
         "`float16`, `bfloat16`, `float32`"),
    # ---- limits --------------------------------------------------------------------------------------------------
    _var("MAX_INPUT_TOKENS", integer(minimum=1), None, "`MAX_TOTAL_TOKENS - 1`", ENGINE, "longest prompt"),
    _var("MAX_INPUT_LENGTH", integer(minimum=1), None, "–", ENGINE, "TGI's older name for `MAX_INPUT_TOKENS`"),
    _var("MAX_TOTAL_TOKENS", integer(minimum=2), None,
         "min(the model's `max_position_embeddings`, the tokens the KV cache holds), as TGI 3", ENGINE,
         "prompt + generated tokens of one request; an omitted `max_tokens`/`max_new_tokens` takes what is left "
         "(`/v1/completions`: 16). Start-up logs both limits and `/info` shows them; a value larger than the KV "
         "cache holds stops start-up with the numbers"),
    _var("MAX_BATCH_PREFILL_TOKENS", integer(minimum=1), None, "512 CPU / 8192 GPU", ENGINE,
         "prompt tokens one engine step computes (prefill chunks), as TGI counts them: the running sequences' "
         "decodes come on top, so a step has at most this plus `MAX_BATCH_SIZE` - 1 rows"),
    _var("MAX_BATCH_SIZE", integer(minimum=1), None, "64 CPU / 256 GPU", ENGINE, "most sequences running at once"),
    _var("MAX_CONCURRENT_REQUESTS", integer(minimum=1), 128, "128", f"{HTTP}, {LAUNCHER}",
         "requests admitted at once by the whole server (every HTTP worker together, counted in a shared table); "
         "more get 429"),
    _var("MAX_STOP_SEQUENCES", integer(minimum=0), 4, "4", HTTP, "stop strings per request"),
    _var("MAX_TOP_N_TOKENS", integer(minimum=0), 5, "5", HTTP, "most `top_n_tokens` (TGI)"),
    _var("MAX_BEST_OF", integer(minimum=1), 2, "2", HTTP, "most `best_of` (TGI)"),
    _var("MAX_CLIENT_BATCH_SIZE", integer(minimum=1), 4, "4", HTTP, "most prompts in one `/v1/completions` request"),
    _var("MESSAGES_API_ENABLED", boolean, None, "unset", HTTP,
         "`/invocations` body: `true` OpenAI chat only, `false` TGI only, unset by shape"),
    # ---- the engine ----------------------------------------------------------------------------------------------
    _var("PREFIX_CACHING", boolean, True, "true", ENGINE, "reuse KV blocks of shared prompt prefixes"),
    _var("KV_CACHE_BLOCK_SIZE", integer(minimum=1, maximum=256), 16, "16", ENGINE,
         "tokens per KV block (power of two ≤ 256)"),
    _var("KV_CACHE_CPU_BYTES", byte_count, 1 << 30, "1GiB", ENGINE, "KV-cache size on CPU (`512MiB`, `2G`, ...)"),
    _var("CUDA_MEMORY_FRACTION", number(), 0.9, "0.9", ENGINE,
         "share of free GPU memory (after a warm-up forward) given to the KV cache"),
    _var("CUDA_GRAPHS", batch_sizes, None, "1,2,4,8,16,...,max batch", ENGINE,
         "decode batch sizes captured as CUDA graphs; `0` disables"),
    _var("ATTENTION_BACKEND", choice("torch", "cpu", "triton"), None,
         "`triton` on CUDA; on CPU `cpu` where the C++ kernels build, else `torch`", ENGINE,
         "force one: `torch` (SDPA over gathered blocks), `cpu` (CPU only: decode rows and prompts in the C++ "
         "kernels; start-up fails if they cannot be built), `triton` (the layers' norm, rotary and SiLU also run as "
         "fused Triton kernels)"),
    _var("CPU_KERNELS_BUILD_DIR", text, None, "`<TINY_MODEL_CACHE>/cpu-kernels`", ENGINE,
         "where the C++ CPU kernels are compiled on first use (one folder per source, torch version and CPU)"),
    _var("CPU_KERNELS_TARGET", text, "auto", "`auto`", ENGINE,
         "the CPU the C++ kernels are compiled for on first use: `auto` is the best x86 level the CPU runs (else "
         "`native`), any other value is gcc's `-march` (x86) or `-mcpu` (ARM)"),
    _var("CPU_KERNELS_PREBUILT_DIR", text, None, "unset; `/opt/cpu-kernels` in the image", ENGINE,
         "a folder of ahead-of-time builds (`python -m model_handler.kernels.cpu_prebuilt DIR`): the engine loads "
         "the best one this CPU runs (`x86-64-v4-bf16`, `x86-64-v4`, `x86-64-v3`) if its manifest's torch version "
         "and kernel sources match, and compiles or uses the torch path otherwise"),
    _var("ASYNC_SCHEDULING", boolean, None, "true on one GPU, else false", ENGINE,
         "one rank only: launch the next step before reading this one's tokens, so host work overlaps the GPU; "
         "requests with penalties or logprobs run step by step meanwhile"),
    _var("ENGINE_CPU_THREADS", integer(minimum=1), None, "every CPU (CPU engine); torch's default on GPU", ENGINE,
         "torch threads of the engine process"),
    _var("SEED", integer(minimum=0), 0, "0", ENGINE, "engine seed for requests without their own"),
    _var("STARTUP_PROGRESS_SECONDS", number(minimum=0.1), 10.0, "10", ENGINE,
         "seconds between the JSON log lines that report the Hub download's and the weight loading's bytes done of "
         "total (a progress bar on a terminal); each start-up phase also logs how long it took"),
    _var("GENERATION_CONFIG", generation_config, "auto", "`auto`", ENGINE,
         "where the model's sampling defaults come from (`temperature`, `top_p`, `top_k`, `min_p`, "
         "`repetition_penalty`, used where a request leaves them unset, as vLLM's `--generation-config`): `auto` the "
         "model folder's `generation_config.json`, `none` never (replies as without the file; `vllm` also means "
         "none), or a folder holding one"),
    # ---- the HTTP side -------------------------------------------------------------------------------------------
    _var("SAGEMAKER_BIND_TO_PORT", integer(minimum=1, maximum=65535), None, "8080", LAUNCHER,
         "listening port (SageMaker's name; wins over `PORT`)"),
    _var("PORT", integer(minimum=1, maximum=65535), 8080, "8080", LAUNCHER, "listening port"),
    _var("WEB_CONCURRENCY", integer(minimum=1), None, "2 where NVIDIA GPUs are visible (`/dev/nvidia0`...), else 1",
         f"{LAUNCHER}, {HTTP}",
         "gunicorn (gevent) worker processes; all share one engine, `/metrics` sums them and "
         "`MAX_CONCURRENT_REQUESTS` counts them together"),
    _var("API_KEY", text, None, "–", HTTP,
         "when set, every route but health, `/info`, `/v1/models`, `/metrics`, `/openapi.json` and `/docs` needs "
         "`Authorization: Bearer <key>`"),
    _var("PAYLOAD_LIMIT", integer(minimum=1), 2_000_000, "2000000", HTTP,
         "largest request body in bytes (413 beyond)"),
    _var("REQUEST_READ_TIMEOUT", integer(minimum=1), 10, "10", HTTP,
         "seconds a client has to send a request's headers (from connecting, or from the previous reply on a "
         "kept-alive connection: the connection is closed after it) and again its body (408 after it); a body cut "
         "short by a close, or shorter than its `Content-Length`, gets a 400 and never reaches the engine"),
    _var("WORKER_CONNECTIONS", integer(minimum=8), 1000, "1000", HTTP,
         "client connections one HTTP worker holds before it closes the ones that have waited longest on their "
         "client (idle, or sending headers or a body) to take new ones, so `/ping` is answered whatever other "
         "connections do"),
    _var("SHUTDOWN_GRACE_PERIOD", integer(minimum=0), 20, "20", f"{LAUNCHER}, {HTTP}",
         "seconds in-flight requests may run on after SIGTERM (no new connections are accepted meanwhile); then each "
         "stream still open ends with an error event (and `[DONE]` on `/v1`), each waiting reply is a 503, the engine "
         "stops and the launcher exits 0. SageMaker sends SIGKILL 30 s after SIGTERM, and ending the requests and "
         "stopping the engine take a few seconds more: keep it at 20 or less there"),
    _var("CORS_ALLOW_ORIGIN", origins, (), "–", HTTP, "comma-separated allowed origins"),
    _var("SERVED_MODEL_NAME", text, None, "the model id", HTTP,
         "the `model` reported in replies and `/v1/models`; comma-separated names are all accepted in a request's "
         "`model` (the first is reported), as are `tgi`, `dummy` (huggingface_hub's), the model id and folder, and "
         "their last path part"),
    _var("COMPUTE_TYPE", text, "gpu+optimized", "`gpu+optimized`", HTTP, "TGI's `x-compute-type` reply header"),
    _var("TOOL_CALL_PARSER", choice("auto", "hermes", "llama3_json", "mistral", "generic"), "auto", "`auto`", HTTP,
         "how tool calls are written and read back: `auto` detects the model family from its chat template and "
         "tokens; `hermes` (`<tool_call>` tags, Qwen), `llama3_json` (Llama 3.1 JSON), `mistral` (`[TOOL_CALLS]`), "
         "`generic` (for templates without tools: the tools are described in the prompt) force one"),
    _var("SAGEMAKER_CONTAINER_LOG_LEVEL", log_level, None, "INFO", "all",
         "log level, `20` or `INFO` style (wins over `LOG_LEVEL`); logs are JSON lines on stdout, each with the "
         "`pid` of the process that wrote it"),
    _var("LOG_LEVEL", log_level, logging.INFO, "INFO", "all", "log level, `20` or `INFO` style"),
    _var("SAGEMAKER_PROGRAM", text, None, "–", ENGINE,
         "set (two of the three empty) by the SageMaker SDK's framework models (`HuggingFaceModel`, which TGI's "
         "SageMaker example deploys): its presence marks a SageMaker endpoint, where a missing model stops start-up "
         "instead of serving the demo model"),
    _var("SAGEMAKER_SUBMIT_DIRECTORY", text, None, "–", ENGINE, "as `SAGEMAKER_PROGRAM`"),
    _var("SAGEMAKER_REGION", text, None, "–", ENGINE, "as `SAGEMAKER_PROGRAM`"),
    # ---- internal: the launcher sets these for its children ------------------------------------------------------
    _var("ENGINE_ADDRESS", text, None, "set by the launcher", f"{ENGINE}, {HTTP}",
         "the engine's ZeroMQ address (internal)"),
    _var("SERVE_ADMISSION_FILE", text, None, "set by the launcher", HTTP,
         "the table in which every HTTP worker counts its admitted requests (internal)"),
    _var("PROMETHEUS_MULTIPROC_DIR", text, None, "set by the launcher", HTTP,
         "where each HTTP worker writes its metrics for any worker to sum (internal; prometheus-client's name)"),
)  # fmt: skip
BY_NAME: dict[str, Variable] = {variable.name: variable for variable in VARIABLES}


def raw(environ: Mapping[str, str], name: str) -> str | None:
    """The stripped text of a declared variable, None when unset or empty."""
    if name not in BY_NAME:
        raise KeyError(f"{name} is not declared in model_handler/envs.py")
    value = environ.get(name)
    if value is None or not value.strip():
        return None
    return value.strip()


def is_set(environ: Mapping[str, str], name: str) -> bool:
    return raw(environ, name) is not None


def get(environ: Mapping[str, str], name: str) -> Any:
    """The typed value of `name` in `environ`, or its declared default when unset."""
    value = raw(environ, name)
    variable = BY_NAME[name]
    return variable.default if value is None else variable.parse(name, value)


def is_present(environ: Mapping[str, str], name: str) -> bool:
    """Whether a declared variable is in `environ` at all, even empty (the SageMaker SDK sends some empty)."""
    if name not in BY_NAME:
        raise KeyError(f"{name} is not declared in model_handler/envs.py")
    return name in environ


def first_set(environ: Mapping[str, str], *names: str) -> str | None:
    """The first of `names` that is set (aliases: SageMaker's name before TGI's), or None."""
    return next((name for name in names if is_set(environ, name)), None)


def process_environ() -> Mapping[str, str]:
    """This process's environment: what the entry points hand to the readers (and the launcher to its children)."""
    return os.environ


def prepend_to_path(directory: str) -> None:
    """Put a folder first on PATH (the one write: torch's extension builder looks for `ninja` on PATH)."""
    os.environ["PATH"] = os.pathsep.join(filter(None, (directory, os.environ.get("PATH"))))


def __getattr__(name: str) -> Any:
    """`envs.NAME`: the variable's value in this process's environment, read at each access."""
    if name in BY_NAME:
        return get(os.environ, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def markdown_table() -> str:
    """The README's configuration table, one row per variable."""
    rows = ["| variable | default | read by | meaning |", "|---|---|---|---|"]
    rows += [f"| `{v.name}` | {v.default_doc} | {v.read_by} | {v.meaning} |" for v in VARIABLES]
    return "\n".join(rows)


if __name__ == "__main__":
    sys.stdout.write(markdown_table() + "\n")
