"""Where the model folder comes from: HF_MODEL_ID (local folder or hub id), /opt/ml/model, or the tiny default.

Only a hub id that is not a local path is downloaded, with huggingface_hub; everything else is read in place.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

SAGEMAKER_MODEL_DIR = "/opt/ml/model"
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
    offline = environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    try:
        path = snapshot_download(
            repo_id,
            revision=environ.get("HF_MODEL_REVISION") or None,
            token=environ.get("HF_TOKEN") or environ.get("HUGGING_FACE_HUB_TOKEN") or None,
            cache_dir=environ.get("HUGGINGFACE_HUB_CACHE") or environ.get("HF_HUB_CACHE") or None,
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
    model_id = (environ.get("HF_MODEL_ID") or "").strip()
    if model_id:
        local = Path(model_id).expanduser()
        if local.is_dir():
            if not (local / "config.json").is_file():
                raise ValueError(f"HF_MODEL_ID={model_id!r} is a folder without a config.json")
            return local, model_id
        if _looks_like_path(model_id):
            raise ValueError(f"HF_MODEL_ID={model_id!r} looks like a path but is not a folder")
        return _download(model_id, environ), model_id
    sm_dir = Path(environ.get("SM_MODEL_DIR") or SAGEMAKER_MODEL_DIR)
    if (sm_dir / "config.json").is_file():
        return sm_dir, str(sm_dir)
    from model_handler.tiny_model import default_model_dir  # builds the embedded model on first use

    tiny = Path(default_model_dir())
    return tiny, "tiny-llama"
