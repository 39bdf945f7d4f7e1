"""What the HTTP side knows of the model it serves: the names a request's `model` may use, its vocabulary size and
its own sampling defaults (generation_config.json); and the refusal of a request for anything else.

A request's `model` may be empty, `tgi` (TGI's documented name; older huggingface_hub clients send it), `dummy`
(what huggingface_hub's InferenceClient sends when pointed at a URL without a model), any name in
SERVED_MODEL_NAME (comma-separated; the first is the one replies report), the model id (HF_MODEL_ID) or folder, or
the last part of any of these ("Llama-3.1-8B-Instruct" for "meta-llama/Llama-3.1-8B-Instruct"), in any case. Anything
else names a model or LoRA adapter this server does not have: TGI would silently answer with the base model, vLLM
refuses; so do we, since the base model must never answer a request meant for an adapter.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from model_handler.engine_protocol import EngineInfo
from serve.errors import ApiError, ErrorKind

TGI_ALIAS = "tgi"
CLIENT_DEFAULTS = (TGI_ALIAS, "dummy")
"""What clients send when their user names no model: TGI's docs and older huggingface_hub say `tgi`, huggingface_hub
2.x pointed at a URL says `dummy`."""


@dataclass(frozen=True, slots=True)
class ServedModel:
    name: str
    """What replies report as `model`."""
    aliases: frozenset[str]
    """Every name a request may use, lower-cased."""
    vocab_size: int
    sampling_defaults: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_info(cls, info: EngineInfo, served_model_name: str | None) -> ServedModel:
        served = [n.strip() for n in (served_model_name or "").split(",") if n.strip()]
        names = [*served, info.model_id, info.model_dir]
        names += [n.rstrip("/").rsplit("/", 1)[-1] for n in names]
        aliases = frozenset(n.lower() for n in [*CLIENT_DEFAULTS, *names] if n)
        return cls(served[0] if served else info.model_id, aliases, info.vocab_size, dict(info.sampling_defaults))

    def check_model(self, requested: str | None, param: str = "model") -> None:
        """A 4xx unless `requested` is empty or one of this model's names."""
        if requested and requested.strip().lower() not in self.aliases:
            raise ApiError(
                ErrorKind.UNKNOWN_MODEL,
                f"The model '{requested}' is not served here: no adapter or model of that name is loaded (LoRA "
                f"adapters are not supported). Send '{self.name}', its model id, or '{TGI_ALIAS}'.",
                param,
            )

    def check_adapter(self, adapter_id: str | None) -> None:
        """TGI's `adapter_id`: no adapter is ever loaded, so any id is refused (TGI would fall back to the base)."""
        if adapter_id:
            raise ApiError(
                ErrorKind.UNKNOWN_MODEL,
                f"`adapter_id`: no adapter '{adapter_id}' is loaded: this server serves the base model {self.name} "
                "only (LoRA adapters are not supported)",
                "adapter_id",
            )
