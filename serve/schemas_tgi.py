"""TGI request bodies (`/generate`, `/generate_stream`, `/`, TGI-shaped `/invocations`) and TGI's checks.

Messages are TGI's own (router/src/validation.rs), so clients that match on them keep working. How each field is
used or refused is declared in `field_uses.py`.
"""

from __future__ import annotations

import random
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, field_validator

from model_handler.constraints import Constraint
from model_handler.sampling_params import SamplingParams
from serve.errors import unsupported, validation
from serve.schemas_tools import Grammar
from serve.served_model import ServedModel
from serve.settings import Settings
from serve.structural_tags import build_constraint

_SEED_LIMIT = 1 << 63


class _Body(BaseModel):
    """A request body: a field it does not know is refused, naming it (a misspelt `max_new_token` must not quietly
    give a different answer)."""

    model_config = ConfigDict(extra="forbid")


class GenerateParameters(_Body):
    best_of: StrictInt | None = None
    temperature: StrictFloat | None = None
    repetition_penalty: StrictFloat | None = None
    frequency_penalty: StrictFloat | None = None
    top_k: StrictInt | None = None
    top_p: StrictFloat | None = None
    typical_p: StrictFloat | None = None
    do_sample: StrictBool = False
    max_new_tokens: StrictInt | None = None
    return_full_text: StrictBool | None = None
    stop: list[StrictStr] = Field(default_factory=list)
    truncate: StrictInt | None = None
    watermark: StrictBool = False
    details: StrictBool = False
    decoder_input_details: StrictBool = False
    seed: StrictInt | None = None
    top_n_tokens: StrictInt | None = None
    grammar: Grammar | None = None
    adapter_id: StrictStr | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _null_stop(cls, value: Any) -> Any:
        return [] if value is None else value

    @property
    def is_sampling(self) -> bool:
        """TGI samples when asked to, or when any warper would change the distribution."""
        return (
            self.do_sample
            or (self.temperature is not None and self.temperature != 1.0)
            or bool(self.top_k)
            or (self.top_p is not None and self.top_p < 1.0)
            or (self.typical_p is not None and self.typical_p < 1.0)
        )

    @property
    def num_sequences(self) -> int:
        return self.best_of or 1


def _default_parameters() -> GenerateParameters:
    # TGI: a body without `parameters` samples (lib.rs default_parameters sets do_sample: true).
    return GenerateParameters(do_sample=True)


class GenerateRequest(_Body):
    inputs: StrictStr
    parameters: GenerateParameters = Field(default_factory=_default_parameters)
    stream: StrictBool = False
    add_special_tokens: StrictBool = True

    @field_validator("parameters", mode="before")
    @classmethod
    def _null_parameters(cls, value: Any) -> Any:
        return _default_parameters() if value is None else value

    def check(self, settings: Settings, streaming: bool) -> None:
        """TGI's parameter checks, in TGI's order, with its messages."""
        p = self.parameters
        if p.best_of is not None:
            if settings.max_best_of == 1 and p.best_of != 1:
                raise validation("`best_of` != 1 is not allowed for this endpoint", "best_of")
            if not 0 < p.best_of <= settings.max_best_of:
                raise validation(f"`best_of` must be > 0 and <= {settings.max_best_of}. Given: {p.best_of}", "best_of")
            if p.best_of > 1:
                if not p.is_sampling:
                    raise validation("you must use sampling when `best_of` is > 1", "best_of")
                if p.seed is not None:
                    raise validation("`seed` must not be set when `best_of` > 1", "seed")
                if streaming:
                    raise validation("`best_of` != 1 is not supported when streaming tokens", "best_of")
        if p.temperature is not None and p.temperature <= 0:
            raise validation("`temperature` must be strictly positive", "temperature")
        if p.repetition_penalty is not None and p.repetition_penalty <= 0:
            raise validation("`repetition_penalty` must be strictly positive", "repetition_penalty")
        if p.frequency_penalty is not None and not -2.0 <= p.frequency_penalty <= 2.0:
            raise validation("`frequency_penalty` must be >= -2.0 and <= 2.0", "frequency_penalty")
        if p.top_p is not None and not 0.0 < p.top_p < 1.0:
            raise validation("`top_p` must be > 0.0 and < 1.0", "top_p")
        if p.typical_p is not None and not 0.0 < p.typical_p < 1.0:
            raise validation("`typical_p` must be > 0.0 and < 1.0", "typical_p")
        if p.top_k is not None and p.top_k <= 0:
            raise validation("`top_k` must be strictly positive", "top_k")
        if p.max_new_tokens is not None and p.max_new_tokens <= 0:
            raise validation("`max_new_tokens` must be strictly positive", "max_new_tokens")
        if len(p.stop) > settings.max_stop_sequences:
            raise validation(
                f"`stop` supports up to {settings.max_stop_sequences} stop sequences. Given: {len(p.stop)}", "stop"
            )
        if p.seed is not None and not 0 <= p.seed < 1 << 64:
            raise validation("`seed` must be an unsigned 64-bit integer", "seed")
        top_n = p.top_n_tokens or 0
        if not 0 <= top_n <= settings.max_top_n_tokens:
            raise validation(
                f"`top_n_tokens` must be >= 0 and <= {settings.max_top_n_tokens}. Given: {top_n}", "top_n_tokens"
            )
        if p.decoder_input_details and streaming:
            raise validation("`decoder_input_details` == true is not supported when streaming tokens")
        if p.watermark:
            raise unsupported("`watermark` == true is not supported: this server does not watermark", "watermark")
        if self.inputs == "":
            raise validation("`inputs` cannot be empty", "inputs")

    def check_truncate(self, max_input_tokens: int) -> None:
        truncate = self.parameters.truncate
        if truncate is not None and not 0 < truncate <= max_input_tokens:
            raise validation(
                f"`truncate` must be strictly positive and less than {max_input_tokens}. Given: {truncate}", "truncate"
            )

    def seeds(self) -> list[int | None]:
        """One seed per sequence: the given one, or TGI's random draw when sampling (None when greedy)."""
        p = self.parameters
        if not p.is_sampling:
            return [None] * p.num_sequences
        if p.seed is not None:
            return [p.seed]
        return [random.randrange(_SEED_LIMIT) for _ in range(p.num_sequences)]

    def constraint(self) -> Constraint | None:
        """`parameters.grammar` as the engine's constraint (the whole output matches it)."""
        grammar = self.parameters.grammar
        if grammar is None:
            return None
        return build_constraint(grammar.answer_format("grammar"), None)

    @property
    def wants_details(self) -> bool:
        """TGI replies with `details` when asked for them or for the prompt's (decoder_input_details)."""
        return self.parameters.details or self.parameters.decoder_input_details

    def to_sampling_params(
        self, max_new_tokens: int, seed: int | None, served: ServedModel, constraint: Constraint | None = None
    ) -> SamplingParams:
        p = self.parameters
        # The model's generation_config.json fills what a sampling request leaves unset; a greedy one stays greedy
        # (TGI's do_sample=false), so its tokens are what TGI gives.
        defaults = served.sampling_defaults if p.is_sampling else {}
        return SamplingParams(
            constraint=constraint,
            max_tokens=max_new_tokens,
            temperature=(p.temperature if p.temperature is not None else defaults.get("temperature", 1.0))
            if p.is_sampling
            else 0.0,
            top_p=p.top_p if p.top_p is not None else defaults.get("top_p", 1.0),
            top_k=p.top_k or int(defaults.get("top_k", 0)),
            min_p=defaults.get("min_p", 0.0),
            typical_p=p.typical_p if p.typical_p is not None else 1.0,
            seed=None if seed is None else seed % _SEED_LIMIT,
            repetition_penalty=(
                p.repetition_penalty if p.repetition_penalty is not None else defaults.get("repetition_penalty", 1.0)
            ),
            frequency_penalty=p.frequency_penalty or 0.0,
            # TGI always reports each token's logprob (stream events and details carry it).
            logprobs=p.top_n_tokens or 0,
            prompt_logprobs=0 if p.decoder_input_details else None,
        )
