"""Shared test set-up: CPU-only defaults and the embedded tiny model folder.

Without a CUDA device Triton kernels run under its interpreter, which must be switched on before anything
imports triton, so it is set here, at collection start; tests marked `gpu` are skipped.
"""

from __future__ import annotations

import os

import pytest
import torch  # importing torch does not import triton, so the variable below is still in time
from hypothesis import settings

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Hypothesis tests (the scheduler state machine) run the same examples on every run in CI: derandomized, no
# example database, no deadline (the machine is shared); the bound keeps them to tens of seconds.
# `pytest --hypothesis-profile=explore` searches further, at random, keeping failures in .hypothesis/.
settings.register_profile(
    "ci",
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=100,
    stateful_step_count=50,
    report_multiple_bugs=False,
    print_blob=True,
)
settings.register_profile("explore", deadline=None, max_examples=1000, stateful_step_count=100, print_blob=True)
settings.load_profile("ci")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_model_dir():
    """The default embedded tiny model folder (cached under TINY_MODEL_CACHE or ~/.cache/sagemaker-llm)."""
    from model_handler.tiny_model import default_model_dir

    return default_model_dir()
