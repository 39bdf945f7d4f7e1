"""Where the model folder comes from: HF_MODEL_ID (local folder or hub id), /opt/ml/model, or the tiny default.

Only a hub id that is not a local path is downloaded, with huggingface_hub; everything else is read in place.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from model_handler import envs

# What a snapshot needs to serve: weights, config and tokenizer; never pickles or other frameworks' weights.
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


def _looks_like_path(value: str) -> bool:
    return value.startswith(("/", "./", "../", "~")) or value.count("/") > 1


def _download(repo_id: str, environ: Mapping[str, str]) -> Path:
    """Fetch a hub snapshot; a clear ValueError when the hub cannot be reached or has no such model."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:  # pragma: no cover - huggingface_hub is a dependency
        raise ValueError(f"HF_MODEL_ID={repo_id!r} is not a local folder and huggingface_hub is missing") from exc
    offline = envs.get(environ, "HF_HUB_OFFLINE")
    try:
        path = snapshot_download(
            repo_id,
            revision=envs.get(environ, "HF_MODEL_REVISION"),
            token=envs.get(environ, "HF_TOKEN") or envs.get(environ, "HUGGING_FACE_HUB_TOKEN"),
            cache_dir=envs.get(environ, "HUGGINGFACE_HUB_CACHE") or envs.get(environ, "HF_HUB_CACHE"),
            allow_patterns=HUB_ALLOW_PATTERNS,
            local_files_only=offline,
        )
    except Exception as exc:  # network, auth, missing repo: all end start-up the same way
        how = "offline (HF_HUB_OFFLINE is set) and not in the local cache" if offline else "could not be downloaded"
        raise ValueError(
            f"HF_MODEL_ID={repo_id!r} is not a local folder and {how} from the Hugging Face Hub: "
            f"{type(exc).__name__}: {exc}. Mount the model under /opt/ml/model or set HF_MODEL_ID to a folder."
        ) from exc
    return Path(path)


def resolve_model_dir(environ: Mapping[str, str]) -> tuple[Path, str]:
    """(model folder, model id shown in /info), in the order HF_MODEL_ID, /opt/ml/model, the embedded tiny model."""
    model_id = envs.get(environ, "HF_MODEL_ID")
    if model_id:
        local = Path(model_id).expanduser()
        if local.is_dir():
            if not (local / "config.json").is_file():
                raise ValueError(f"HF_MODEL_ID={model_id!r} is a folder without a config.json")
            return local, model_id
        if _looks_like_path(model_id):
            raise ValueError(f"HF_MODEL_ID={model_id!r} looks like a path but is not a folder")
        return _download(model_id, environ), model_id
    sm_dir = Path(envs.get(environ, "SM_MODEL_DIR"))
    if (sm_dir / "config.json").is_file():
        return sm_dir, str(sm_dir)
    from model_handler.tiny_model import default_model_dir  # builds the embedded model on first use

    tiny = Path(default_model_dir(cache=envs.get(environ, "TINY_MODEL_CACHE")))
    return tiny, "tiny-llama"
