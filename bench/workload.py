"""The fixed workload: distinct chat prompts of an exact templated token length, and each server's request body.

Every request gets its own window of text (so no server gains from a shared prefix beyond the chat template),
trimmed until `apply_chat_template(..., add_generation_prompt=True)` yields exactly `prompt_tokens` ids.
With random weights a greedy reply can repeat one invisible token (a lone UTF-8 continuation byte) and stream
nothing, so prompts may be screened: only those whose first greedy tokens decode to visible text are kept.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any

_MAX_TRIM_STEPS = 12
_MAX_SCREEN_PASSES = 5
_SCREEN_BATCH = 16


@dataclass(slots=True)
class Prompt:
    messages: list[dict[str, str]]
    num_tokens: int  # templated length, generation prompt included


def _corpus_words() -> list[str]:
    import pydoc_data.topics  # CPython's own reference text: always present, no download

    return " ".join(pydoc_data.topics.topics.values()).split()


def _templated_length(tokenizer: Any, content: str) -> int:
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    return len(ids)


def _fit_content(tokenizer: Any, text: str, prompt_tokens: int) -> tuple[str, int]:
    """Cut `text` at a token count that makes the templated prompt exactly `prompt_tokens` long (or closest)."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    overhead = _templated_length(tokenizer, "")
    keep = max(1, prompt_tokens - overhead)
    best = ("", 0)
    for _ in range(_MAX_TRIM_STEPS):
        content = tokenizer.decode(ids[:keep])
        length = _templated_length(tokenizer, content)
        if abs(length - prompt_tokens) < abs(best[1] - prompt_tokens) or not best[0]:
            best = (content, length)
        if length == prompt_tokens:
            break
        keep = max(1, keep + (prompt_tokens - length))  # re-tokenizing at the cut can merge or split a token
    return best


def build_prompts(
    tokenizer: Any, num_prompts: int, prompt_tokens: int, seed: int = 0, model_dir: str | None = None
) -> list[Prompt]:
    """`num_prompts` distinct single-turn chats whose templated length is `prompt_tokens` (checked, not assumed).

    With `model_dir`, candidates are screened with `visible_prompts` and only those that stream text are kept.
    """
    if prompt_tokens < 8:
        raise ValueError(f"prompt_tokens must be >= 8, got {prompt_tokens}")
    words = _corpus_words()
    rng = random.Random(seed)
    span = prompt_tokens * 2  # words per window: more than enough tokens to cut from
    prompts: list[Prompt] = []
    for _ in range(_MAX_SCREEN_PASSES):
        candidates = []
        for _ in range((num_prompts - len(prompts)) * 3 // 2 + 2):  # most candidates pass the screen
            start = rng.randrange(0, len(words) - span)
            content, length = _fit_content(tokenizer, " ".join(words[start : start + span]), prompt_tokens)
            candidates.append(Prompt(messages=[{"role": "user", "content": content}], num_tokens=length))
        prompts += visible_prompts(model_dir, tokenizer, candidates) if model_dir else candidates
        if len(prompts) >= num_prompts:
            return prompts[:num_prompts]
    raise ValueError(f"only {len(prompts)} of {num_prompts} prompts give a visible greedy reply from {model_dir}")


def _is_visible(tokenizer: Any, token_id: int) -> bool:
    text = tokenizer.decode([token_id], skip_special_tokens=True)
    return bool(text) and "\ufffd" not in text


def visible_prompts(model_dir: str, tokenizer: Any, prompts: list[Prompt], num_tokens: int = 4) -> list[Prompt]:
    """The prompts whose first `num_tokens` greedy tokens (EOS suppressed) each decode to visible text."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Loading weights" bar in the benchmark's output
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    by_length: dict[int, list[Prompt]] = {}
    for prompt in prompts:
        by_length.setdefault(prompt.num_tokens, []).append(prompt)
    kept = []
    for group in by_length.values():  # equal lengths: a batch needs no padding
        for start in range(0, len(group), _SCREEN_BATCH):
            batch = group[start : start + _SCREEN_BATCH]
            input_ids = torch.tensor(
                [
                    tokenizer.apply_chat_template(
                        p.messages, add_generation_prompt=True, tokenize=True, return_dict=False
                    )
                    for p in batch
                ]
            )  # [batch, prompt_tokens]
            with torch.inference_mode():
                output = model.generate(
                    input_ids=input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    do_sample=False,
                    max_new_tokens=num_tokens,
                    min_new_tokens=num_tokens,
                    pad_token_id=tokenizer.pad_token_id,
                )  # [batch, prompt_tokens + num_tokens]
            for prompt, new_ids in zip(batch, output[:, input_ids.shape[1] :].tolist()):
                if all(_is_visible(tokenizer, token_id) for token_id in new_ids):
                    kept.append(prompt)
    return kept


def chat_body(flavor: str, model_name: str, prompt: Prompt, output_tokens: int) -> dict[str, Any]:
    """The request body that makes a server generate exactly `output_tokens` greedy tokens.

    flavor "openai-ext" (ours and the naive server): max_tokens + our extra fields `ignore_eos`/`min_tokens`, and
    usage in the stream. "tf-serve" / "tf-serve-cb": `transformers serve` rejects unknown fields with 422 but takes
    a whole `generation_config` as a JSON string; plain generate honours `min_new_tokens`, the continuous-batching
    manager only the per-request `eos_token_id` (-1 disables EOS). It always reports usage in its last chunk.
    """
    body: dict[str, Any] = {
        "model": model_name,
        "messages": prompt.messages,
        "stream": True,
        "max_tokens": output_tokens,
        "temperature": 0.0,
    }
    if flavor == "openai-ext":
        body.update(ignore_eos=True, min_tokens=output_tokens, stream_options={"include_usage": True})
    elif flavor == "tf-serve":
        config = {"max_new_tokens": output_tokens, "min_new_tokens": output_tokens, "do_sample": False}
        body["generation_config"] = json.dumps(config)
    elif flavor == "tf-serve-cb":
        config = {"max_new_tokens": output_tokens, "eos_token_id": -1, "do_sample": False}
        body["generation_config"] = json.dumps(config)
    else:
        raise ValueError(f"unknown request flavor {flavor!r}")
    return body
