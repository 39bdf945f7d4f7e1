"""Reply bodies of both dialects, built from finished or in-progress generations.

OpenAI: chat completions and their stream chunks, legacy completions, usage and logprobs (with `bytes`).
TGI: `GenerateResponse` with `details`, `StreamResponse` events; field names and nesting as TGI's serde output.
"""

from __future__ import annotations

import importlib.metadata
import time
import uuid
from dataclasses import dataclass, field

from serve.chat_output import ChoiceOutput
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


def usage(generations: list[Generation], num_prompt_tokens: int | None = None) -> dict:
    """Token counts; the prompt counts once per distinct prompt, however many choices share it."""
    completion = sum(g.num_generated for g in generations)
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
) -> dict:
    body = reply.envelope("chat.completion.chunk")
    body["choices"] = [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]
    if include_usage:
        body["usage"] = None
    return body


def usage_chunk(reply: OpenAIReply, object_type: str, usage_body: dict) -> dict:
    body = reply.envelope(object_type)
    body["choices"] = []
    body["usage"] = usage_body
    return body


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


def completion_chunk(reply: OpenAIReply, choice: dict, include_usage: bool = False) -> dict:
    body = reply.envelope("text_completion")
    body["choices"] = [choice]
    if include_usage:
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


def tgi_sequence_details(tokenizer: TextTokenizer, generation: Generation, top_n_tokens: int) -> dict:
    """The fields a TGI `Details` and a `BestOfSequence` share."""
    details = {
        "finish_reason": generation.finish.tgi if generation.finish else "length",
        "generated_tokens": generation.num_generated,
        "seed": generation.seed,
        "prefill": [],
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
) -> dict:
    """`GenerateResponse`: the text (after `prefix`, the prompt when return_full_text) and optional details."""
    body: dict = {"generated_text": prefix + best.text}
    if details:
        body["details"] = tgi_sequence_details(tokenizer, best, top_n_tokens)
        if others:
            body["details"]["best_of_sequences"] = [
                {"generated_text": prefix + g.text, **tgi_sequence_details(tokenizer, g, top_n_tokens)} for g in others
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
