"""Engine: requests in, one scheduler step at a time, token outputs out (token ids only, no text).

`step()` is the whole loop: schedule -> model runner -> sampler -> scheduler update -> RequestOutputs.
The engine process (`server.py`) drives it; tests and benchmarks can drive it directly.

With async scheduling (ASYNC_SCHEDULING, the default on one GPU) one step stays in flight: `step()` launches
the next step, its inputs patched on the device with the tokens the step before sampled, and only then reads
those tokens. The host's scheduling, batching and output handling then overlap the GPU's forward instead of
leaving it idle between steps. A step's outputs thus come from the following `step()` call; requests with
penalties, logprobs or a grammar (which need the tokens on the host first) run the plain, synchronous way, as do
those that ask for prompt logprobs (`prompt_logprobs.py`: their prompt rows' logits are read in the step that
computes them).

A request with an output constraint waits in a `GrammarWaitlist` while its grammar compiles on a worker thread;
the others keep stepping, and it joins the schedule at the first step after the compile.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from model_handler import sampler
from model_handler.block_manager import BlockManager
from model_handler.config import EngineConfig
from model_handler.engine_protocol import EngineInfo, EngineRequest, RequestOutput, TokenLogprob
from model_handler.generation_defaults import read_sampling_defaults
from model_handler.grammar_compiler import GrammarCompiler, xgrammar_version
from model_handler.grammar_waitlist import GrammarWaitlist
from model_handler.input_patch import InputPatch
from model_handler.model_runner import ModelRunner
from model_handler.prompt_logprobs import take_prompt_logprobs
from model_handler.sampler import Sampler
from model_handler.scheduler import Scheduler, SchedulerOutput
from model_handler.sequence import Sequence
from model_handler.startup_progress import StartupPhases

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class InFlightStep:
    """A launched step whose sampled tokens are still on the device (async scheduling)."""

    sampled_seqs: list[Sequence]
    """The sequences that sample in it, in row order; each holds a placeholder for its token."""
    token_ids: torch.Tensor
    """[len(sampled_seqs)] int64 on the device."""
    host_token_ids: torch.Tensor
    """Their copy in pinned host memory, queued right after the sampling."""
    copied: torch.cuda.Event | None
    """Recorded after that copy. `.tolist()` on the device tensor would wait for the whole stream, the
    step launched after this one included; this waits for this step only."""


class Engine:
    def __init__(self, config: EngineConfig, phases: StartupPhases | None = None) -> None:
        """Load the model, size and allocate the KV cache, settle the token limits from it, warm up (and capture
        CUDA graphs on GPU); `phases` times each step for the start-up log.

        With `tensor_parallel_size` N > 1 this process is rank 0: the model runner starts ranks 1..N-1,
        which hold the other shards; this process alone schedules and samples.
        """
        self.config = config
        self.model_config = config.model()
        self.eos_token_ids = tuple(self.model_config.eos_token_ids)
        # The logits' width is the config's vocab_size (the LM head's rows), which may exceed the tokenizer's.
        self.grammar_compiler = GrammarCompiler(
            config.model_dir, self.model_config.vocab_size, list(self.eos_token_ids)
        )
        self.grammar_compiler.prepare()  # meanwhile the model loads
        self.grammar_waitlist = GrammarWaitlist(self.grammar_compiler)
        self.sampling_defaults = read_sampling_defaults(config.generation_config, config.model_dir)
        self.model_runner = ModelRunner(
            config,
            self.model_config,
            tp_size=config.tensor_parallel_size,
            warm_up_sampling=sampler.warm_up,
            phases=phases,
        )
        self.context = self.model_runner.context
        self.block_manager = BlockManager(
            self.model_runner.num_kv_blocks,
            config.block_size,
            config.enable_prefix_caching,
            kv_window=self.model_config.kv_window,
        )
        self.scheduler = Scheduler(
            self.block_manager,
            config.max_num_seqs,
            config.max_num_prefill_tokens,
            self.context.max_model_len,
            self.eos_token_ids,
            self.model_config.rope_length_rule,
        )
        self.sampler = Sampler(self.model_runner.device, config.seed)
        self._aborted: list[RequestOutput] = []
        self._in_flight: InFlightStep | None = None
        logger.info("engine ready: %s", self.info())

    def add_request(self, request: EngineRequest) -> None:
        """Queue a request; ValueError when it could never run (too long, bad ids, duplicate id)."""
        self._validate(request)
        rule = self.model_config.rope_length_rule
        salt = 0 if rule is None else rule.cache_salt(len(request.prompt_token_ids))
        seq = Sequence(request, self.eos_token_ids, cache_salt=salt)
        if request.sampling_params.constraint is not None:
            self.grammar_waitlist.add(seq)
        else:
            self.scheduler.add(seq)

    def set_wakeup(self, wakeup: Callable[[], None]) -> None:
        """Have `wakeup` called (from a compile thread) whenever a waiting request's grammar is done."""
        self.grammar_compiler.on_ready = wakeup

    def abort_requests(self, request_ids: list[str]) -> None:
        """Free the requests' KV blocks now; each gets a finished ABORTED output from the next step()."""
        for seq in self.scheduler.abort(request_ids) + self.grammar_waitlist.abort(request_ids):
            self._aborted.append(self._output(seq, [], None))

    def step(self) -> list[RequestOutput]:
        outputs, self._aborted = self._aborted, []
        if len(self.grammar_waitlist):
            outputs += self._admit_compiled()
        previous, self._in_flight = self._in_flight, None
        if self.config.async_scheduling and self._all_requests_can_overlap():
            self._in_flight = self._launch(previous)  # before reading `previous`: the GPU keeps busy
            if previous is not None:
                outputs += self._read(previous)
            return outputs
        if previous is not None:  # a request that needs the host-side path arrived: drain first
            return outputs + self._read(previous)
        scheduled = self.scheduler.schedule()
        if scheduled.is_empty:
            return outputs
        logits = self.model_runner.execute(scheduled)  # [num_sampling (+ prompt rows), vocab]
        if scheduled.num_prompt_logit_rows:
            logits = take_prompt_logprobs(scheduled, logits)  # [num_sampling, vocab]
        sampled = self.sampler(logits, [e.seq for e in scheduled.scheduled if e.samples])
        seqs = self.scheduler.update_from_output(scheduled, sampled.token_ids)
        logprobs = sampled.logprobs or [None] * len(seqs)
        outputs += [self._output(seq, [seq.token_ids[-1]], lp) for seq, lp in zip(seqs, logprobs)]
        return outputs

    def _admit_compiled(self) -> list[RequestOutput]:
        """Waiting requests whose grammar is done join the schedule; those whose constraint failed end here."""
        admitted, refused = self.grammar_waitlist.pop_ready()
        for seq in admitted:
            self.scheduler.add(seq)
        return [self._output(seq, [], None) for seq in refused]

    def _all_requests_can_overlap(self) -> bool:
        """Penalties read the output tokens, logprobs go back with them, a grammar's mask follows them: all
        need them on the host."""
        return not any(
            p.logprobs is not None
            or p.prompt_logprobs is not None
            or p.repetition_penalty != 1.0
            or p.frequency_penalty
            or p.presence_penalty
            or p.constraint is not None
            for p in (seq.sampling_params for seq in self.scheduler.requests.values())
        )

    def _launch(self, previous: InFlightStep | None) -> InFlightStep | None:
        """Schedule and launch a step without waiting for its tokens; inputs that are `previous`'s still
        unread tokens are filled in on the device."""
        scheduled = self.scheduler.schedule()
        if scheduled.is_empty:
            return None
        patch = self._patch_for(scheduled, previous)
        logits = self.model_runner.execute(scheduled, patch)  # [num_sampling, vocab]
        sampling = [e.seq for e in scheduled.scheduled if e.samples]
        token_ids = self.sampler.choose(logits, sampling)  # [num_sampling] on the device
        if token_ids.device.type != "cuda":
            return InFlightStep(self.scheduler.advance(scheduled), token_ids, token_ids, None)
        host = torch.empty(token_ids.shape, dtype=token_ids.dtype, pin_memory=True)
        host.copy_(token_ids, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        return InFlightStep(self.scheduler.advance(scheduled), token_ids, host, copied)

    @staticmethod
    def _patch_for(scheduled: SchedulerOutput, previous: InFlightStep | None) -> InputPatch | None:
        """Where this step's flat batch holds placeholders, and which of `previous`'s rows replace them."""
        if previous is None:
            return None
        row_of = {id(seq): row for row, seq in enumerate(previous.sampled_seqs)}
        rows, source_rows = [], []
        flat = 0
        for entry in scheduled.scheduled:
            seq = entry.seq
            if seq.num_pending_tokens:  # its last token is the placeholder; this step computes it
                rows.append(flat + seq.num_tokens - 1 - entry.num_computed_tokens)
                source_rows.append(row_of[id(seq)])
            flat += entry.num_new_tokens
        if not rows:
            return None
        return InputPatch(torch.tensor(rows), torch.tensor(source_rows), previous.token_ids)

    def _read(self, step: InFlightStep) -> list[RequestOutput]:
        """Wait for a launched step's tokens and hand them to their sequences."""
        if step.copied is not None:
            step.copied.synchronize()  # the one host sync of a step: this step's tokens, not the next one's
        token_ids = step.host_token_ids.tolist()
        resolved = self.scheduler.resolve(step.sampled_seqs, token_ids)
        return [self._output(seq, [token], None) for seq, token in resolved]

    def has_unfinished_requests(self) -> bool:
        return self.has_ready_requests() or len(self.grammar_waitlist) > 0

    def has_ready_requests(self) -> bool:
        """`step()` has work now; False while the only requests left wait for their grammar to compile."""
        return (
            self.scheduler.num_unfinished > 0
            or bool(self._aborted)
            or self._in_flight is not None
            or self.grammar_waitlist.has_ready()
        )

    def stats(self) -> tuple[int, int, int]:
        """(num_running, num_waiting, num_free_blocks); requests whose grammar is compiling count as waiting."""
        num_waiting = len(self.scheduler.waiting) + len(self.grammar_waitlist)
        return len(self.scheduler.running), num_waiting, self.block_manager.num_free_blocks

    def info(self) -> EngineInfo:
        config, runner = self.config, self.model_runner
        return EngineInfo(
            model_id=config.model_id or str(config.model_dir),
            model_dir=str(config.model_dir),
            architecture=self.model_config.architecture,
            dtype=config.dtype,
            device=str(runner.device),
            max_model_len=self.context.max_model_len,
            max_input_tokens=self.context.max_input_tokens,
            max_position_embeddings=self.context.model_limit,
            context_limited_by=self.context.limited_by,
            block_size=config.block_size,
            num_kv_blocks=runner.num_kv_blocks,
            kv_cache_bytes=runner.kv_cache_bytes,
            max_num_seqs=config.max_num_seqs,
            max_num_prefill_tokens=config.max_num_prefill_tokens,
            eos_token_ids=list(self.eos_token_ids),
            vocab_size=self.model_config.vocab_size,
            attention_backend=runner.backend.name,
            cuda_graphs=runner.graph_runner is not None,
            prefix_caching=config.enable_prefix_caching,
            tensor_parallel_size=config.tensor_parallel_size,
            grammar_backend=xgrammar_version(),
            sampling_defaults=dict(self.sampling_defaults),
        )

    @staticmethod
    def _output(seq: Sequence, new_token_ids: list[int], logprob: TokenLogprob | None) -> RequestOutput:
        return RequestOutput(
            request_id=seq.request_id,
            new_token_ids=new_token_ids,
            finish_reason=seq.finish_reason,
            new_logprobs=None if logprob is None else [logprob],
            num_prompt_tokens=seq.num_prompt_tokens,
            num_cached_tokens=seq.num_cached_tokens,
            failure_message=seq.failure_message,
            prompt_logprobs=seq.take_prompt_logprobs() if new_token_ids else None,
        )

    def _validate(self, request: EngineRequest) -> None:
        prompt, params = request.prompt_token_ids, request.sampling_params
        max_len = self.context.max_model_len
        if not prompt:
            raise ValueError("the prompt has no tokens")
        if request.request_id in self.grammar_waitlist or request.request_id in self.scheduler.requests:
            raise ValueError(f"request id {request.request_id!r} is already running")
        vocab_size = self.model_config.vocab_size
        if min(prompt) < 0 or max(prompt) >= vocab_size:
            raise ValueError(f"prompt token ids must be in [0, {vocab_size})")
        if params.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {params.max_tokens}")
        # The start-up sized max_len to what the KV cache holds (context_limits.py): a request within it fits.
        if len(prompt) + params.max_tokens > max_len:
            raise ValueError(
                f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) exceeds the model length "
                f"{max_len} (MAX_TOTAL_TOKENS, limited by {self.context.limited_by})"
            )
        if params.temperature < 0 or not 0 < params.top_p <= 1 or params.top_k < 0 or params.repetition_penalty <= 0:
            raise ValueError("temperature must be >= 0, top_p in (0, 1], top_k >= 0 and repetition_penalty > 0")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(params, name)
            if k is not None and not 0 <= k <= vocab_size:
                raise ValueError(f"{name} must be between 0 and {vocab_size}")
        if not 0.0 <= params.min_p <= 1.0 or not 0.0 < params.typical_p <= 1.0:
            raise ValueError("min_p must be in [0, 1] and typical_p in (0, 1]")
        for token_id, bias in params.logit_bias.items():
            if not 0 <= token_id < vocab_size or not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias: token {token_id} must be in [0, {vocab_size}), its bias in [-100, 100]")
