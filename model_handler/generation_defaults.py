"""The model's own sampling defaults: `temperature`, `top_p`, `top_k`, `min_p` and `repetition_penalty` from its
folder's generation_config.json, used where a request leaves them unset (as vLLM does by default).

GENERATION_CONFIG (declared in envs.py) picks the source: `auto` (the model folder), `none` (never; `vllm` is
vLLM's spelling of it), or a folder holding a generation_config.json. As vLLM (`to_diff_dict`), values equal to
transformers' GenerationConfig defaults are left out, so a file that merely restates them changes nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

TRANSFORMERS_DEFAULTS: dict[str, float | None] = {
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 50,
    "min_p": None,
    "repetition_penalty": 1.0,
}
"""The keys read, with transformers' GenerationConfig default of each (a value equal to it is not a default)."""

_VALID = {
    "temperature": (lambda v: v >= 0, ">= 0"),
    "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "top_k": (lambda v: v >= 0 and float(v).is_integer(), "a whole number >= 0"),
    "min_p": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "repetition_penalty": (lambda v: v > 0, "> 0"),
}


def read_sampling_defaults(source: str, model_dir: str | Path) -> dict[str, float]:
    """The defaults `source` (GENERATION_CONFIG: `auto`, `none` or a folder) gives for `model_dir`; {} when there
    are none."""
    if source == "none":
        return {}
    path = Path(model_dir if source == "auto" else source) / "generation_config.json"
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    defaults: dict[str, float] = {}
    for key, transformers_default in TRANSFORMERS_DEFAULTS.items():
        value = data.get(key)
        if value is None or value == transformers_default:
            continue
        is_valid, expected = _VALID[key]
        if isinstance(value, bool) or not isinstance(value, int | float) or not is_valid(value):
            raise ValueError(f"{path}: {key}={value!r} must be {expected} (set GENERATION_CONFIG=none to ignore it)")
        defaults[key] = int(value) if key == "top_k" else float(value)
    return defaults
