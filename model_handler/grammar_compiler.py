"""Compiles output constraints into xgrammar grammars on worker threads, once per distinct constraint.

xgrammar is imported lazily, on the worker thread: an image without it still serves unconstrained requests and
refuses constrained ones with a message saying why. The model's tokenizer is loaded on the first compile, with
the logits' width as the vocabulary, so token ids past the tokenizer's (a padded LM head) are never allowed.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from model_handler.constraints import Constraint, ConstraintKind
from model_handler.json_schema_support import find_unsupported_keyword, with_string_lengths_as_patterns

MAX_JSON_WHITESPACE = 16
"""Most whitespace characters in a row that a JSON grammar allows: a newline and indentation three levels deep
at 4 spaces (or seven at 2). xgrammar's default is unbounded, which lets a weak model spend its whole budget on
spaces and newlines between two JSON tokens."""
NUM_COMPILE_THREADS = 2
"""Worker threads, so one slow grammar does not hold up every other request's."""
MAX_CACHED_GRAMMARS = 256
"""Compiled grammars (and compile errors) kept for reuse, least recently used dropped first."""
_MAX_MESSAGE_CHARS = 500
_LOG_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: .*? is false: )?")

_WHAT = {
    ConstraintKind.JSON_SCHEMA: "the JSON schema",
    ConstraintKind.JSON_OBJECT: "the JSON object grammar",
    ConstraintKind.REGEX: "the regex",
    ConstraintKind.STRUCTURAL_TAG: "the structural tag",
}


class GrammarError(ValueError):
    """A constraint that cannot be compiled, or constrained decoding unavailable; the message is the client's."""


def import_xgrammar() -> Any:
    """The xgrammar module; GrammarError naming the missing package when this image lacks it."""
    try:
        import xgrammar
    except ImportError as exc:
        raise GrammarError(
            f"constrained decoding is unavailable: the engine's image lacks the xgrammar package ({exc})"
        ) from None
    return xgrammar


def xgrammar_version() -> str:
    """ "xgrammar <version>" when the package is there to import (it is not imported here), "" when it is not."""
    try:
        if importlib.util.find_spec("xgrammar") is None:
            return ""
        return f"xgrammar {importlib.metadata.version('xgrammar')}"
    except (ValueError, ImportError):  # ValueError: a None in sys.modules, how tests and some images block it
        return ""


def _clean(message: str) -> str:
    """xgrammar's C++ error text without its log prefix ("[12:00:00] /project/cpp/x.cc:12: Check failed: ...")."""
    message = _LOG_PREFIX.sub("", message.strip())
    return message if len(message) <= _MAX_MESSAGE_CHARS else message[: _MAX_MESSAGE_CHARS - 3] + "..."


def _prepared(schema: Any) -> Any:
    """The schema as xgrammar gets it; GrammarError when it uses a keyword the grammar would silently drop."""
    problem = find_unsupported_keyword(schema)
    if problem is not None:
        raise GrammarError(problem)
    return with_string_lengths_as_patterns(schema)


def _prepare_tag(node: Any) -> Any:
    """A structural tag with each JSON-schema part prepared (`_prepared`) and its whitespace held to
    MAX_JSON_WHITESPACE, unless the part sets its own bound."""
    if isinstance(node, list):
        return [_prepare_tag(item) for item in node]
    if not isinstance(node, dict):
        return node
    if node.get("type") != "json_schema":
        return {key: _prepare_tag(value) for key, value in node.items()}
    prepared = {**node, "json_schema": _prepared(node.get("json_schema"))}
    if prepared.get("max_whitespace_cnt") is None:
        prepared["max_whitespace_cnt"] = MAX_JSON_WHITESPACE
    return prepared


class GrammarCompiler:
    """Turns constraints into compiled grammars off the step loop; equal constraints share one compile.

    `submit` is called from the step loop's thread only; the futures complete on the worker threads, each
    calling `on_ready` (the engine server's wake-up) when it does.
    """

    def __init__(self, model_dir: str | Path, vocab_size: int, eos_token_ids: list[int]) -> None:
        self.model_dir = Path(model_dir)
        self.vocab_size = vocab_size
        """Width of the logits (the LM head's rows): the bitmask covers every id the model can emit."""
        self.eos_token_ids = list(eos_token_ids)
        self.on_ready: Callable[[], None] | None = None
        self.num_compiles = 0
        self.num_cache_hits = 0
        self._cache: OrderedDict[Constraint, Future] = OrderedDict()
        self._pool: ThreadPoolExecutor | None = None
        self._compiler: Any = None
        self._compiler_lock = threading.Lock()

    def prepare(self) -> None:
        """Import xgrammar and load the tokenizer now, on a worker thread, when xgrammar is there: both hold the
        GIL for a while (up to a second), which the step loop then spends at start-up rather than in the middle
        of serving, at the first constrained request. A failure here is met again, and reported, by `submit`."""
        if xgrammar_version():
            self._worker_pool().submit(self._xgrammar_compiler)

    def submit(self, constraint: Constraint) -> Future:
        """The compiled grammar of `constraint`, as a future; its exception is a GrammarError for the client."""
        future = self._cache.get(constraint)
        if future is not None:
            self.num_cache_hits += 1
            self._cache.move_to_end(constraint)
        else:
            self.num_compiles += 1
            future = self._worker_pool().submit(self._compile, constraint)
            self._cache[constraint] = future
            self._evict()
        future.add_done_callback(self._notify)
        return future

    def _worker_pool(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(NUM_COMPILE_THREADS, thread_name_prefix="grammar-compile")
        return self._pool

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def _notify(self, _future: Future) -> None:
        if self.on_ready is not None:
            self.on_ready()

    def _evict(self) -> None:
        """Drop the least recently used finished entries past MAX_CACHED_GRAMMARS (running compiles stay)."""
        excess = len(self._cache) - MAX_CACHED_GRAMMARS
        for constraint in [c for c, f in self._cache.items() if f.done()][: max(excess, 0)]:
            del self._cache[constraint]

    def _compile(self, constraint: Constraint) -> Any:
        """Runs on a worker thread: the compiled grammar, or GrammarError naming the problem."""
        compiler = self._xgrammar_compiler()
        what = _WHAT[constraint.kind]
        try:
            if constraint.kind is ConstraintKind.JSON_SCHEMA:
                return compiler.compile_json_schema(
                    json.dumps(_prepared(json.loads(constraint.value))),
                    strict_mode=constraint.strict,
                    any_whitespace=True,
                    max_whitespace_cnt=MAX_JSON_WHITESPACE,
                )
            if constraint.kind is ConstraintKind.JSON_OBJECT:
                return compiler.compile_json_schema(
                    '{"type": "object"}', strict_mode=False, any_whitespace=True, max_whitespace_cnt=MAX_JSON_WHITESPACE
                )
            if constraint.kind is ConstraintKind.REGEX:
                return compiler.compile_regex(constraint.value)
            tag = _prepare_tag(json.loads(constraint.value))
            return compiler.compile_structural_tag(json.dumps(tag))
        except json.JSONDecodeError as exc:
            raise GrammarError(f"{what} is invalid: not JSON ({exc})") from None
        except GrammarError as exc:
            raise GrammarError(f"{what} is invalid: {exc}") from None
        except Exception as exc:  # xgrammar raises RuntimeError (and a few ValueError subclasses) for bad input
            raise GrammarError(f"{what} is invalid: {_clean(str(exc))}") from None

    def _xgrammar_compiler(self) -> Any:
        """xgrammar's compiler over the model's tokenizer, built once (the first compile loads the tokenizer)."""
        with self._compiler_lock:
            if self._compiler is None:
                xgr = import_xgrammar()
                try:
                    from transformers import AutoTokenizer

                    tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir))
                    info = xgr.TokenizerInfo.from_huggingface(
                        tokenizer, vocab_size=self.vocab_size, stop_token_ids=self.eos_token_ids
                    )
                except Exception as exc:
                    raise GrammarError(
                        f"constrained decoding is unavailable: the model's tokenizer could not be loaded ({exc})"
                    ) from None
                # xgrammar's own cache is off: `submit` caches by constraint, compile errors included.
                self._compiler = xgr.GrammarCompiler(info, max_threads=NUM_COMPILE_THREADS, cache_enabled=False)
            return self._compiler
