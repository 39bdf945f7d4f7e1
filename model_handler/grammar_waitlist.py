"""Requests whose grammar is still compiling: held out of the schedule, so the step loop never waits for a
compile, then admitted with a matcher of their own, or refused with the compile's error."""

from __future__ import annotations

from concurrent.futures import Future

from model_handler.engine_protocol import FinishReason
from model_handler.grammar_compiler import GrammarCompiler, GrammarError
from model_handler.grammar_matcher import RequestGrammar
from model_handler.sequence import Sequence, SequenceStatus


class GrammarWaitlist:
    """Constrained sequences in arrival order, each with the future of its compiled grammar."""

    def __init__(self, compiler: GrammarCompiler) -> None:
        self.compiler = compiler
        self._waiting: dict[str, tuple[Sequence, Future]] = {}

    def __len__(self) -> int:
        return len(self._waiting)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._waiting

    def add(self, seq: Sequence) -> None:
        """Start (or reuse) the compile of the sequence's constraint; it waits here until that is done."""
        self._waiting[seq.request_id] = (seq, self.compiler.submit(seq.sampling_params.constraint))

    def has_ready(self) -> bool:
        """Some waiting sequence's compile has finished (the step loop has something to do)."""
        return any(future.done() for _, future in self._waiting.values())

    def pop_ready(self) -> tuple[list[Sequence], list[Sequence]]:
        """(sequences whose grammar compiled, each given a matcher of its own; sequences whose constraint did
        not compile, finished REJECTED with the reason in `failure_message`), in arrival order."""
        admitted: list[Sequence] = []
        refused: list[Sequence] = []
        for request_id, (seq, future) in list(self._waiting.items()):
            if not future.done():
                continue
            del self._waiting[request_id]
            try:
                seq.grammar = RequestGrammar(future.result())
            except GrammarError as exc:
                self._finish(seq, FinishReason.REJECTED, str(exc))
                refused.append(seq)
            except Exception as exc:  # a failure of the compiler itself: the engine's fault, not the client's
                self._finish(seq, FinishReason.ERROR, f"compiling the request's grammar failed: {exc!r}")
                refused.append(seq)
            else:
                admitted.append(seq)
        return admitted, refused

    def abort(self, request_ids: list[str]) -> list[Sequence]:
        """Drop these waiting requests (their compiles still finish and stay cached); unknown ids are ignored."""
        aborted = []
        for request_id in request_ids:
            entry = self._waiting.pop(request_id, None)
            if entry is not None:
                self._finish(entry[0], FinishReason.ABORTED)
                aborted.append(entry[0])
        return aborted

    @staticmethod
    def _finish(seq: Sequence, reason: FinishReason, message: str = "") -> None:
        seq.finish_reason = reason
        seq.failure_message = message
        seq.status = SequenceStatus.FINISHED
