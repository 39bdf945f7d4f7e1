"""Reply bodies of both dialects, built from finished or in-progress generations.

OpenAI: chat completions and their stream chunks, legacy completions, usage and logprobs (with `bytes`).
TGI: `GenerateResponse` with `details`, `StreamResponse` events; field names and nesting as TGI's serde output.
"""

from __future__ import annotations

import importlib.metadata
import time
import uuid
from dataclasses import dataclass, field

from model_handler.engine_protocol import TokenLogprob
from serve.chat_output import ChoiceOutput
from serve.detokenizer import IncrementalDetokenizer
from serve.generation import GeneratedToken, Generation
from serve.tokenizer import TextTokenizer


def _version() -> str:
    try:
        return importlib.metadata.version("sagemaker-llm-container")
    except importlib.metadata.PackageNotFoundError:
        return "0.1.0"  # a source checkout that was not pip-installed (setup.cfg says 0.1.0)


SERVER_VERSION = _version()
SYSTEM_FINGERPRINT = f"{SERVER_VERSION}-native"
_MIN_LOGPROB = -9999.0  # what OpenAI reports for -inf; JSON has no infinity


def _logprob(value: float | None) -> float:
    if value is None or value != value or value == float("-inf"):
        return _MIN_LOGPROB
    return float(value)


# ---- OpenAI -----------------------------------------------------------------------------------------


@dataclass(slots=True)
class OpenAIReply:
    """What every body and chunk of one OpenAI reply repeats: its id, creation time and model name."""

    model: str
    object_prefix: str = "chatcmpl"
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        if not self.id:
            self.id = f"{self.object_prefix}-{uuid.uuid4().hex}"

    def envelope(self, object_type: str) -> dict:
        return {
            "id": self.id,
            "object": object_type,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
        }


def usage(generations: list[Generation], num_prompt_tokens: int | None = None, generated: bool = True) -> dict:
    """Token counts; the prompt counts once per distinct prompt, however many choices share it. `generated`
    False: the generated tokens are not part of the reply (an echo with max_tokens 0) and count as none."""
    completion = sum(g.num_generated for g in generations) if generated else 0
    if num_prompt_tokens is None:
        num_prompt_tokens = generations[0].num_prompt_tokens if generations else 0
    cached = max((g.num_cached_tokens for g in generations), default=0)
    return {
        "prompt_tokens": num_prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": num_prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def chat_logprobs(tokenizer: TextTokenizer, tokens: list[GeneratedToken]) -> dict:
    """`choices[].logprobs` of a chat reply or chunk: each token's text, logprob, bytes and top alternatives."""
    content = []
    for token in tokens:
        content.append(
            {
                "token": tokenizer.token_text(token.token_id),
                "logprob": _logprob(token.logprob),
                "bytes": list(tokenizer.token_bytes(token.token_id)),
                "top_logprobs": [
                    {
                        "token": tokenizer.token_text(top_id),
                        "logprob": _logprob(top_logprob),
                        "bytes": list(tokenizer.token_bytes(top_id)),
                    }
                    for top_id, top_logprob in token.top
                ],
            }
        )
    return {"content": content, "refusal": None}


def chat_completion(
    reply: OpenAIReply,
    generations: list[Generation],
    tokenizer: TextTokenizer,
    logprobs: bool,
    outputs: list[ChoiceOutput],
) -> dict:
    """The whole reply; `outputs[i]` is choice i's text parsed into content, reasoning and tool calls."""
    body = reply.envelope("chat.completion")
    body["choices"] = [
        {
            "index": g.index,
            "message": output.message(),
            "logprobs": chat_logprobs(tokenizer, g.tokens) if logprobs else None,
            "finish_reason": output.finish_reason(g.finish.openai if g.finish else "stop"),
        }
        for g, output in zip(generations, outputs, strict=True)
    ]
    body["usage"] = usage(generations)
    return body


def chat_chunk(
    reply: OpenAIReply,
    index: int,
    delta: dict,
    finish_reason: str | None = None,
    logprobs: dict | None = None,
    include_usage: bool = False,
    usage_so_far: dict | None = None,
) -> dict:
    """A chunk; its `usage` is null when the stream ends with a usage chunk, or the usage so far (vLLM's
    continuous_usage_stats)."""
    body = reply.envelope("chat.completion.chunk")
    body["choices"] = [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]
    if usage_so_far is not None:
        body["usage"] = usage_so_far
    elif include_usage:
        body["usage"] = None
    return body


def usage_chunk(reply: OpenAIReply, object_type: str, usage_body: dict) -> dict:
    body = reply.envelope(object_type)
    body["choices"] = []
    body["usage"] = usage_body
    return body


def prompt_completion_logprobs(tokenizer: TextTokenizer, prompt_ids: list[int], logprobs: list[TokenLogprob]) -> dict:
    """Legacy completions' logprobs of an echoed prompt: the first token has none (null), as OpenAI and vLLM."""
    out: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    detokenizer = IncrementalDetokenizer(tokenizer)  # offsets index the prompt's text as decoded
    offset = 0
    for position, token_id in enumerate(prompt_ids):
        scored = logprobs[position - 1] if 0 < position <= len(logprobs) else None
        out["tokens"].append(tokenizer.token_text(token_id))
        out["token_logprobs"].append(None if scored is None else _logprob(scored.logprob))
        out["top_logprobs"].append(
            None if scored is None else {tokenizer.token_text(i): _logprob(lp) for i, lp in scored.top}
        )
        out["text_offset"].append(offset)
        offset += len(detokenizer.add(token_id))
    return out


def join_completion_logprobs(first: dict, second: dict) -> dict:
    return {key: first[key] + second[key] for key in first}


def completion_logprobs(tokenizer: TextTokenizer, tokens: list[GeneratedToken], text_offset: int) -> dict:
    """Legacy completions' logprobs: parallel lists of token texts, logprobs, top maps and text offsets."""
    out: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    offset = text_offset
    for token in tokens:
        text = tokenizer.token_text(token.token_id)
        out["tokens"].append(text)
        out["token_logprobs"].append(_logprob(token.logprob))
        out["top_logprobs"].append({tokenizer.token_text(i): _logprob(lp) for i, lp in token.top})
        out["text_offset"].append(offset)
        offset += len(token.text)
    return out


def completion_choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def completion(reply: OpenAIReply, choices: list[dict], usage_body: dict) -> dict:
    body = reply.envelope("text_completion")
    body["choices"] = choices
    body["usage"] = usage_body
    return body


def completion_chunk(
    reply: OpenAIReply, choice: dict, include_usage: bool = False, usage_so_far: dict | None = None
) -> dict:
    body = reply.envelope("text_completion")
    body["choices"] = [choice]
    if usage_so_far is not None:
        body["usage"] = usage_so_far
    elif include_usage:
        body["usage"] = None
    return body


# ---- TGI --------------------------------------------------------------------------------------------


def tgi_token(token: GeneratedToken) -> dict:
    return {"id": token.token_id, "text": token.text, "logprob": token.logprob, "special": token.special}


def tgi_top_tokens(tokenizer: TextTokenizer, token: GeneratedToken) -> list[dict]:
    return [
        {
            "id": top_id,
            "text": tokenizer.token_text(top_id),
            "logprob": top_logprob,
            "special": tokenizer.is_special(top_id),
        }
        for top_id, top_logprob in token.top
    ]


def tgi_prefill(tokenizer: TextTokenizer, prompt_ids: list[int], logprobs: list[TokenLogprob]) -> list[dict]:
    """TGI's `prefill` (decoder_input_details): each prompt token's id, text and logprob, the first one's null."""
    return [
        {
            "id": token_id,
            "text": tokenizer.decode([token_id], skip_special_tokens=False),
            "logprob": logprobs[position - 1].logprob if 0 < position <= len(logprobs) else None,
        }
        for position, token_id in enumerate(prompt_ids)
    ]


def tgi_sequence_details(
    tokenizer: TextTokenizer, generation: Generation, top_n_tokens: int, prompt_ids: list[int] | None = None
) -> dict:
    """The fields a TGI `Details` and a `BestOfSequence` share; `prompt_ids` given: the prefill too."""
    prefill = [] if prompt_ids is None else tgi_prefill(tokenizer, prompt_ids, generation.prompt_logprobs)
    details = {
        "finish_reason": generation.finish.tgi if generation.finish else "length",
        "generated_tokens": generation.num_generated,
        "seed": generation.seed,
        "prefill": prefill,
        "tokens": [tgi_token(t) for t in generation.tokens],
    }
    if top_n_tokens:
        details["top_tokens"] = [tgi_top_tokens(tokenizer, t) for t in generation.tokens]
    return details


def tgi_generate_response(
    tokenizer: TextTokenizer,
    best: Generation,
    others: list[Generation],
    prefix: str,
    details: bool,
    top_n_tokens: int,
    prompt_ids: list[int] | None = None,
) -> dict:
    """`GenerateResponse`: the text (after `prefix`, the prompt when return_full_text) and optional details
    (with the prompt's `prefill` when `prompt_ids` are given: decoder_input_details)."""
    body: dict = {"generated_text": prefix + best.text}
    if details:
        body["details"] = tgi_sequence_details(tokenizer, best, top_n_tokens, prompt_ids)
        if others:
            body["details"]["best_of_sequences"] = [
                {"generated_text": prefix + g.text, **tgi_sequence_details(tokenizer, g, top_n_tokens, prompt_ids)}
                for g in others
            ]
    return body


def tgi_stream_event(
    tokenizer: TextTokenizer,
    index: int,
    token: GeneratedToken,
    top_n_tokens: int,
    generated_text: str | None = None,
    details: dict | None = None,
) -> dict:
    event: dict = {"index": index, "token": tgi_token(token)}
    if top_n_tokens:
        event["top_tokens"] = tgi_top_tokens(tokenizer, token)
    event["generated_text"] = generated_text
    event["details"] = details
    return event


def tgi_stream_details(generation: Generation) -> dict:
    return {
        "finish_reason": generation.finish.tgi if generation.finish else "length",
        "generated_tokens": generation.num_generated,
        "seed": generation.seed,
        "input_length": generation.num_prompt_tokens,
    }
