"""Following engine requests on the HTTP side: token ids in, released text, tokens and a finish reason out.

`Generation` wraps one engine request (detokenizer, stop strings, counts, timings); `merge` interleaves the
updates of several (n > 1, best_of, batched prompts) as they arrive. Closing either aborts what is unfinished.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import gevent
import gevent.queue

from model_handler.engine_protocol import FinishReason, OutputStream, RequestOutput, TokenLogprob
from serve.detokenizer import IncrementalDetokenizer
from serve.engine_client import EngineDeadError
from serve.errors import ApiError, ErrorKind
from serve.stop_strings import StopStringMatcher
from serve.tokenizer import TextTokenizer


class Finish(enum.Enum):
    """Why one generation ended, before each dialect spells it."""

    EOS = "eos"
    STOP_TOKEN = "stop_token"
    STOP_STRING = "stop_string"
    LENGTH = "length"
    ABORTED = "aborted"
    ERROR = "error"

    @property
    def openai(self) -> str:
        return "length" if self is Finish.LENGTH else "stop"

    @property
    def tgi(self) -> str:
        if self is Finish.LENGTH:
            return "length"
        if self is Finish.STOP_STRING:
            return "stop_sequence"
        return "eos_token"


_ENGINE_FINISH = {
    FinishReason.EOS: Finish.EOS,
    FinishReason.STOP_TOKEN: Finish.STOP_TOKEN,
    FinishReason.LENGTH: Finish.LENGTH,
    FinishReason.ABORTED: Finish.ABORTED,
}
_FAILURE_KIND = {FinishReason.REJECTED: ErrorKind.VALIDATION, FinishReason.ERROR: ErrorKind.GENERATION}


@dataclass(slots=True)
class GeneratedToken:
    token_id: int
    text: str
    """The text this token released (TGI's token text); a special token shows its own content."""
    special: bool
    logprob: float | None = None
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass(slots=True)
class Update:
    """What one engine step added to one generation."""

    index: int
    text: str
    tokens: list[GeneratedToken]
    finish: Finish | None = None


class Generation:
    """One engine request followed to its end; iterate `updates()` once."""

    def __init__(
        self,
        index: int,
        stream: OutputStream,
        tokenizer: TextTokenizer,
        stops: list[str],
        include_stop: bool,
        num_prompt_tokens: int,
        seed: int | None = None,
        visible_ids: dict[int, str] | None = None,
    ) -> None:
        self.index = index
        self.stream = stream
        self.seed = seed
        self.num_prompt_tokens = num_prompt_tokens
        self.num_cached_tokens = 0
        self.tokens: list[GeneratedToken] = []
        self.prompt_logprobs: list[TokenLogprob] = []
        """Prompt tokens 1..n-1's logprobs, when the request asked for them (they come with the first token)."""
        self.finish: Finish | None = None
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self._tokenizer = tokenizer
        self._detokenizer = IncrementalDetokenizer(tokenizer, visible_ids)
        self._matcher = StopStringMatcher(stops, include_stop)
        self._include_stop = include_stop

    @property
    def text(self) -> str:
        return self._matcher.text

    @property
    def num_generated(self) -> int:
        return len(self.tokens)

    @property
    def mean_logprob(self) -> float:
        logprobs = [t.logprob for t in self.tokens if t.logprob is not None]
        return sum(logprobs) / len(logprobs) if logprobs else float("-inf")

    def updates(self) -> Iterator[Update]:
        """Each step's update until the generation ends. An engine failure (the engine refused or failed the
        request, or stopped answering) raises ApiError: the one place where one becomes an API error."""
        try:
            for output in self.stream:
                update = self._on_output(output)
                if update is not None:
                    yield update
                if self.finish is not None:
                    return
        except EngineDeadError as exc:
            self.finish = Finish.ERROR
            raise ApiError(ErrorKind.GENERATION, str(exc)) from exc
        finally:
            self.close()

    def close(self) -> None:
        """Abort the engine request if it is still running (idempotent)."""
        self.stream.close()

    def _on_output(self, output: RequestOutput) -> Update | None:
        now = time.monotonic()
        if output.num_prompt_tokens:
            self.num_cached_tokens = output.num_cached_tokens
        if output.new_token_ids and self.first_token_at is None:
            self.first_token_at = now
        if output.prompt_logprobs:
            self.prompt_logprobs += output.prompt_logprobs
        logprobs = output.new_logprobs or []
        released: list[str] = []
        new_tokens: list[GeneratedToken] = []
        # A stop token id (vLLM's stop_token_ids) ends the text before it unless stops are kept (as vLLM's).
        drop_last = output.finish_reason is FinishReason.STOP_TOKEN and not self._include_stop
        for position, token_id in enumerate(output.new_token_ids):
            is_dropped = drop_last and position == len(output.new_token_ids) - 1
            piece = "" if is_dropped else self._detokenizer.add(token_id)
            special = self._tokenizer.is_special(token_id)
            token = GeneratedToken(token_id, self._tokenizer.token_text(token_id) if special else piece, special)
            if position < len(logprobs):
                token.logprob = logprobs[position].logprob
                token.top = list(logprobs[position].top)
            new_tokens.append(token)
            self.tokens.append(token)
            text, stopped = self._matcher.feed(piece)
            released.append(text)
            if stopped:
                self.finish = Finish.STOP_STRING
                self.stream.close()  # the engine would keep generating for nothing
                break
        if self.finish is None and output.finished:
            if output.finish_reason.is_failure:
                self.finish = Finish.ERROR
                self.finished_at = now
                raise ApiError(_FAILURE_KIND[output.finish_reason], output.failure_message)
            text, stopped = self._matcher.feed(self._detokenizer.flush())
            released.append(text)
            released.append(self._matcher.finish())
            self.finish = Finish.STOP_STRING if stopped else _ENGINE_FINISH.get(output.finish_reason, Finish.LENGTH)
        if self.finish is not None:
            self.finished_at = now
        text = "".join(released)
        if not text and not new_tokens and self.finish is None:
            return None
        return Update(self.index, text, new_tokens, self.finish)


def merge(generations: list[Generation]) -> Iterator[Update]:
    """The updates of several generations in arrival order; closing the iterator aborts them all."""
    if len(generations) == 1:
        yield from generations[0].updates()
        return
    queue: gevent.queue.Queue = gevent.queue.Queue()
    done = object()

    def pump(generation: Generation) -> None:
        try:
            for update in generation.updates():
                queue.put(update)
        except BaseException as exc:  # re-raised in the consumer, which owns error reporting
            queue.put(exc)
        finally:
            queue.put(done)

    workers = [gevent.spawn(pump, g) for g in generations]
    remaining = len(workers)
    try:
        while remaining:
            item = queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        gevent.killall(workers, block=False)
        for generation in generations:
            generation.close()
