"""Where the model folder comes from: HF_MODEL_ID (local folder or Hub id), /opt/ml/model, or the tiny demo model.

Only a Hub id that is not a local path is downloaded (`hub_download.py`); everything else is read in place. The
embedded demo model (random weights) serves `make serve` and a bare local `docker run IMAGE serve`; on SageMaker
a missing model stops start-up instead, so an endpoint never turns healthy answering with random weights.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from contextlib import nullcontext
from pathlib import Path

from model_handler import envs
from model_handler.startup_progress import StartupPhases

logger = logging.getLogger(__name__)

SAGEMAKER_SDK_VARIABLES = ("SAGEMAKER_PROGRAM", "SAGEMAKER_SUBMIT_DIRECTORY", "SAGEMAKER_REGION")
"""The SageMaker Python SDK's framework models (HuggingFaceModel, which TGI's own SageMaker example deploys) put
these in the container definition, two of them empty; neither `make serve` nor `docker run IMAGE serve` sets
them. SageMaker Studio and notebook instances set other SAGEMAKER_* names (a developer running `make serve`
there keeps the demo model), so the rule names these three rather than a prefix."""


def sagemaker_evidence(environ: Mapping[str, str], model_dir: Path) -> str | None:
    """Why this container is taken to run on a SageMaker endpoint, or None when nothing says so.

    Two signals, either suffices: a SageMaker SDK variable is present (even empty), or the model folder is a
    mount point, which SageMaker makes of /opt/ml/model when a model is deployed with `ModelDataUrl` (the
    image's own /opt/ml/model is a plain folder, so its presence says nothing: every local run has it too)."""
    present = [name for name in SAGEMAKER_SDK_VARIABLES if envs.is_present(environ, name)]
    if present:
        return f"{present[0]} is set (the SageMaker SDK sets it on every model it deploys)"
    if os.path.ismount(model_dir):
        return f"{model_dir} is a mount point (SageMaker mounts the model's ModelDataUrl there)"
    return None


def check_a_model_is_given_on_sagemaker(environ: Mapping[str, str]) -> None:
    """ValueError naming HF_MODEL_ID and /opt/ml/model when neither gives a model on SageMaker. Torch-free and
    quick: the engine process calls it before its heavy imports, so the container fails within seconds."""
    if envs.get(environ, "HF_MODEL_ID"):
        return
    sm_dir = Path(envs.get(environ, "SM_MODEL_DIR"))
    if (sm_dir / "config.json").is_file():
        return
    evidence = sagemaker_evidence(environ, sm_dir)
    if evidence is not None:
        raise ValueError(
            f"no model to serve: HF_MODEL_ID is not set and {sm_dir} holds no config.json. On SageMaker ({evidence}) "
            f"the demo model is never served: set HF_MODEL_ID to a Hugging Face Hub id (and HF_TOKEN for a gated "
            f"model), or deploy the model's files with model_data so they are unpacked to {sm_dir}"
        )


def _looks_like_path(value: str) -> bool:
    return value.startswith(("/", "./", "../", "~")) or value.count("/") > 1


def resolve_model_dir(environ: Mapping[str, str], phases: StartupPhases | None = None) -> tuple[Path, str]:
    """(model folder, model id shown in /info), in the order HF_MODEL_ID, /opt/ml/model, the embedded tiny model;
    ValueError when none applies on SageMaker, naming both ways to give a model."""
    model_id = envs.get(environ, "HF_MODEL_ID")
    if model_id:
        local = Path(model_id).expanduser()
        if local.is_dir():
            if not (local / "config.json").is_file():
                raise ValueError(f"HF_MODEL_ID={model_id!r} is a folder without a config.json")
            return local, model_id
        if _looks_like_path(model_id):
            raise ValueError(f"HF_MODEL_ID={model_id!r} looks like a path but is not a folder")
        from model_handler.hub_download import HubOptions, download_model

        with phases.phase("download", repo_id=model_id) if phases is not None else nullcontext():
            return download_model(model_id, HubOptions.from_env(environ)), model_id
    sm_dir = Path(envs.get(environ, "SM_MODEL_DIR"))
    if (sm_dir / "config.json").is_file():
        return sm_dir, str(sm_dir)
    check_a_model_is_given_on_sagemaker(environ)
    from model_handler.tiny_model import default_model_dir  # builds the embedded model on first use

    tiny = Path(default_model_dir(cache=envs.get(environ, "TINY_MODEL_CACHE")))
    logger.warning(
        "no model given (HF_MODEL_ID unset, no config.json in %s): serving the embedded tiny demo model, random "
        "weights, for local tries only; set HF_MODEL_ID or mount a model at %s",
        sm_dir,
        sm_dir,
        extra={"model_dir": str(tiny)},
    )
    return tiny, "tiny-llama"
