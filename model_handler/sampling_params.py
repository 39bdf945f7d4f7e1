"""How one request wants its tokens chosen and when it wants to stop.

A plain record with no torch in it: the HTTP side builds it from a request body and it crosses the
process seam as is.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from model_handler.constraints import Constraint


@dataclass(slots=True)
class SamplingParams:
    """Sampling and stopping settings of one request, validated by the HTTP side before they get here."""

    max_tokens: int = 16
    """Most new tokens to generate; the engine also stops at the model's context length."""
    min_tokens: int = 0
    """EOS and stop tokens are suppressed until this many tokens exist (benchmarks force lengths this way)."""
    temperature: float = 1.0
    """0 means greedy (argmax); otherwise logits are divided by it before sampling."""
    top_p: float = 1.0
    top_k: int = 0
    """0 disables top-k."""
    min_p: float = 0.0
    """vLLM's min-p: tokens less likely than min_p x the most likely one are dropped; 0 is off."""
    typical_p: float = 1.0
    """Locally typical sampling (TGI, transformers): keep the tokens whose information is closest to the
    distribution's entropy, up to this much probability mass; 1.0 is off."""
    logit_bias: dict[int, float] = field(default_factory=dict)
    """Added to these token ids' logits after the penalties (OpenAI's logit_bias, each in [-100, 100])."""
    seed: int | None = None
    """Per-request seed: the same seed, prompt and settings give the same tokens."""
    repetition_penalty: float = 1.0
    """CTRL/HF penalty over prompt and output tokens; 1.0 is off."""
    frequency_penalty: float = 0.0
    """OpenAI semantics: minus penalty x count of the token in the output so far."""
    presence_penalty: float = 0.0
    """OpenAI semantics: minus penalty once for every token already in the output."""
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    """Extra token ids that end the request (the model's EOS ids are added by the engine)."""
    logprobs: int | None = None
    """None: no logprobs; 0: the chosen token's logprob; k > 0: also the k most likely alternatives."""
    prompt_logprobs: int | None = None
    """None: none; k >= 0: the logprob of every prompt token after the first (and its k most likely
    alternatives), computed from the prompt's own logits (TGI's decoder_input_details, OpenAI's echo)."""
    constraint: Constraint | None = None
    """The output must match this (JSON schema, regex, tool calls); None leaves it free."""

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1
