"""ModelRunner: the model and its KV cache on one device; a SchedulerOutput in, the sampled rows' logits out.

Each step's flat batch (all sequences' new tokens concatenated) is built with a handful of numpy ops, not
per-token Python: on CPU this is the hot loop of small models. With tensor parallelism rank 0's runner
starts the other ranks, sends them each step's batch, and every rank runs its shard of the same forward.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import threading
from collections.abc import Callable

import numpy as np
import torch

from model_handler import kv_cache
from model_handler.config import EngineConfig
from model_handler.context_limits import log_context, resolve_context
from model_handler.cuda_graphs import CudaGraphRunner
from model_handler.host_to_device import to_device
from model_handler.input_patch import InputPatch
from model_handler.kernels import select_backend
from model_handler.layers.attention_metadata import AttentionMetadata
from model_handler.model_config import ModelConfig
from model_handler.model_loader import load_model
from model_handler.models.causal_lm import CausalLM
from model_handler.scheduler import SchedulerOutput
from model_handler.startup_progress import ByteProgress, StartupPhases, format_bytes
from model_handler.step_broadcast import StepBroadcast, StepInputs
from model_handler.tp_worker import TPWorkers, check_shardable, exit_with_parent
from model_handler.weights import checkpoint_bytes

logger = logging.getLogger(__name__)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class ModelRunner:
    def __init__(
        self,
        config: EngineConfig,
        model_config: ModelConfig,
        tp_rank: int = 0,
        tp_size: int = 1,
        tp_init_method: str | None = None,
        warm_up_sampling: Callable[[torch.Tensor], None] | None = None,
        phases: StartupPhases | None = None,
    ) -> None:
        """Rank 0 of a `tp_size` > 1 group starts ranks 1..tp_size-1 itself; those pass their rank and the
        group's `tp_init_method`. `warm_up_sampling(logits)` (rank 0's engine passes its sampler's worst case)
        runs after the warm-up forward, so the KV cache is sized with the sampling temporaries counted.
        `phases` times load, warm-up, KV sizing and CUDA graphs (the engine process's start-up log)."""
        self.config = config
        self._warm_up_sampling = warm_up_sampling
        self.phases = phases if phases is not None else StartupPhases()
        self.model_config = model_config
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.device = torch.device(config.device)
        if self.device.type == "cuda" and tp_size > 1:
            self.device = torch.device("cuda", tp_rank)  # one GPU per rank
        elif self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())  # memory queries need an index
        self.dtype = config.torch_dtype
        self.block_size = config.block_size
        # The longest a sequence can be before the KV cache is sized (the warm-up's and the CPU budget's bound).
        self.length_bound = config.max_model_len or int(model_config.max_position_embeddings)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.workers: TPWorkers | None = None
        self.broadcast: StepBroadcast | None = None
        if tp_size > 1:
            check_shardable(model_config, tp_size)
            if tp_rank == 0:
                self.workers = TPWorkers(config, tp_size, run_tp_rank)
                tp_init_method = self.workers.init_method
            if tp_init_method is None:
                raise ValueError(f"tensor-parallel rank {tp_rank} needs the group's init method")
        try:
            if tp_size > 1:
                self.broadcast = StepBroadcast.join(tp_rank, tp_size, tp_init_method, self.device)
            self._load_and_allocate()
        except BaseException:
            self._abort()
            raise
        if self.workers is not None:
            # Before multiprocessing's own exit hook (atexit runs last-registered first), which would
            # terminate the workers and so trip their watchdog.
            atexit.register(self.shutdown)

    def _load_and_allocate(self) -> None:
        """Load the weights, warm up at the step budget, size the KV cache from what is left, settle the
        context from the cache (`context_limits.py`), allocate, capture the decode graphs. The context comes
        after the cache because an unset MAX_TOTAL_TOKENS is what the cache holds; the block-table width and
        the graphs' buffers come after the context."""
        config, model_config = self.config, self.model_config
        self.backend = select_backend(self.device, config.attention_backend)
        with self.phases.phase("load", model_dir=str(config.model_dir)):
            self.model = self._load_model()
        self.num_kv_heads = self.model.num_kv_heads_per_rank
        self.block_bytes = kv_cache.block_bytes(
            model_config.num_layers, self.block_size, self.num_kv_heads, model_config.head_dim, self.dtype
        )
        if self.broadcast is not None:
            self.broadcast.barrier()  # ranks load at their own pace; the model group's timeout starts after
        scratch_bytes = self._warm_up_at_step_budget()
        with self.phases.phase("kv_sizing"):
            num_blocks = self._num_kv_blocks(scratch_bytes)
            if self.broadcast is not None:
                num_blocks = self.broadcast.min_over_ranks(num_blocks)  # every rank holds as many
            self.num_kv_blocks = num_blocks
            self.context = resolve_context(
                config.max_model_len,
                config.max_input_tokens,
                int(model_config.max_position_embeddings),
                num_blocks,
                self.block_size,
                self._cache_size_hint(num_blocks),
                kv_window=model_config.kv_window,  # every layer slides: blocks before the window are freed
                max_chunk_tokens=config.max_num_prefill_tokens,
            )
            self.max_blocks_per_seq = _cdiv(self.context.max_model_len, self.block_size)
            self.kv_cache_bytes = self.num_kv_blocks * self.block_bytes
            self._cache, self.kv_caches = self._allocate(self.num_kv_blocks)
        log_context(self.context, self.num_kv_blocks, self.block_size, self.kv_cache_bytes)
        self.graph_runner: CudaGraphRunner | None = None
        # Graphs need a backend with no host syncs: the torch reference reads lengths on the host.
        if self.device.type == "cuda" and config.cuda_graph_sizes and self.backend.name != "torch":
            with self.phases.phase("cuda_graphs", batch_sizes=len(config.cuda_graph_sizes)):
                self.graph_runner = CudaGraphRunner(
                    self.model,
                    self.kv_caches,
                    config.cuda_graph_sizes,
                    self.max_blocks_per_seq,
                    self.context.max_model_len,
                    model_config.hidden_size,
                    self.dtype,
                    self.device,
                )

    # ---- start-up ---------------------------------------------------------------------------------

    def _load_model(self) -> CausalLM:
        config = self.config
        progress = None
        if self.tp_rank == 0:  # every rank reads the same files: one report is enough
            total = checkpoint_bytes(config.model_dir)
            progress = ByteProgress("load", "loading weights", total, config.progress_interval_s)
        model = load_model(
            config.model_dir,
            dtype=self.dtype,
            device=self.device,
            attention_backend=self.backend,
            tp_rank=self.tp_rank,
            tp_size=self.tp_size,
            model_config=self.model_config,
            progress=progress,
        )
        if progress is not None:
            progress.close()
        return model

    def _allocate(self, num_blocks: int) -> tuple[torch.Tensor, list[kv_cache.KVCache]]:
        cfg = self.model_config
        return kv_cache.allocate(
            cfg.num_layers, num_blocks, self.block_size, self.num_kv_heads, cfg.head_dim, self.dtype, self.device
        )

    def _warm_up_at_step_budget(self) -> int:
        """First-call costs off the clock; on CUDA a forward at the largest step, whose peak memory the KV cache
        sizing subtracts. Returns the warm-up's scratch cache bytes (part of that peak, gone when serving)."""
        config = self.config
        if self.device.type != "cuda":
            with self.phases.phase("warm_up"):
                self._warm_up(min(config.max_num_prefill_tokens, 256), num_seqs=4)
            return 0
        with self.phases.phase("warm_up", num_tokens=config.max_step_tokens, num_seqs=config.max_num_seqs):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            scratch_bytes = self._warm_up(config.max_step_tokens, num_seqs=config.max_num_seqs)
            self._warm_up(1, num_seqs=1)  # one-row linears: each weight shape's kernel is timed and chosen now
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
        return scratch_bytes

    def _num_kv_blocks(self, scratch_bytes: int) -> int:
        """KV blocks this rank can hold: KV_CACHE_CPU_BYTES on CPU (never more than every sequence at the
        longest length could use), the GPU memory left after the warm-up on CUDA."""
        config = self.config
        if self.device.type != "cuda":
            max_useful = config.max_num_seqs * _cdiv(self.length_bound, self.block_size)
            # KV_CACHE_CPU_BYTES is the machine's budget: CPU ranks share one memory, a block spans them all.
            all_ranks_block_bytes = self.block_bytes * self.tp_size
            return kv_cache.num_cpu_blocks(config.kv_cache_cpu_bytes, all_ranks_block_bytes, max_useful)
        return kv_cache.num_cuda_blocks(self.device, config.cuda_memory_fraction, self.block_bytes, scratch_bytes)

    def _cache_size_hint(self, num_blocks: int) -> str:
        """Which setting sized the cache, for the context's error messages."""
        per_block = format_bytes(self.block_bytes)
        if self.device.type != "cuda":
            return f"KV_CACHE_CPU_BYTES={format_bytes(self.config.kv_cache_cpu_bytes)} at {per_block} a block"
        return (
            f"CUDA_MEMORY_FRACTION={self.config.cuda_memory_fraction} of the GPU after the weights and the warm-up: "
            f"{format_bytes(num_blocks * self.block_bytes)} at {per_block} a block"
        )

    @torch.inference_mode()
    def _warm_up(self, num_tokens: int, num_seqs: int) -> int:
        """A forward of `num_tokens` prompt tokens over `num_seqs` sequences, plus their logits and sampling
        temporaries, on a scratch cache; returns the scratch cache's bytes."""
        max_len = self.length_bound
        num_seqs = max(min(num_seqs, num_tokens), _cdiv(num_tokens, max_len))
        lens = [num_tokens // num_seqs + (i < num_tokens % num_seqs) for i in range(num_seqs)]
        num_blocks = sum(_cdiv(n, self.block_size) for n in lens)
        scratch, caches = self._allocate(num_blocks)
        tables = np.zeros((num_seqs, _cdiv(max(lens), self.block_size)), dtype=np.int32)
        next_block = 0
        for i, n in enumerate(lens):
            used = _cdiv(n, self.block_size)
            tables[i, :used] = np.arange(next_block, next_block + used)
            next_block += used
        positions = np.concatenate([np.arange(n) for n in lens])
        seq_idx = np.repeat(np.arange(num_seqs), lens)
        slots = tables[seq_idx, positions // self.block_size].astype(np.int64) * self.block_size
        slots += positions % self.block_size
        cu = np.zeros(num_seqs + 1, dtype=np.int32)
        np.cumsum(lens, out=cu[1:])
        inputs = StepInputs(
            input_ids=torch.zeros(num_tokens, dtype=torch.int64),
            positions=torch.from_numpy(positions.astype(np.int64)),
            slot_mapping=torch.from_numpy(slots),
            query_start_loc=torch.from_numpy(cu),
            seq_lens=torch.tensor(lens, dtype=torch.int32),
            block_tables=torch.from_numpy(tables),
            logits_indices=torch.from_numpy(cu[1:].astype(np.int64) - 1),
            max_query_len=max(lens),
            max_seq_len=max(lens),
        )
        logits = self._forward(inputs, caches)
        if self._warm_up_sampling is not None:
            self._warm_up_sampling(logits)
        scratch_bytes = scratch.numel() * scratch.element_size()
        del scratch, caches, logits
        return scratch_bytes

    # ---- per step ---------------------------------------------------------------------------------

    def prepare(self, out: SchedulerOutput) -> StepInputs:
        """The flat batch of a step: tokens, positions, KV slots and attention layout, built on the host."""
        entries = out.scheduled
        num_seqs = len(entries)
        bs = self.block_size
        starts = np.fromiter((e.num_computed_tokens for e in entries), dtype=np.int64, count=num_seqs)
        q_lens = np.fromiter((e.num_new_tokens for e in entries), dtype=np.int64, count=num_seqs)
        seq_lens = starts + q_lens  # [num_seqs]
        cu = np.zeros(num_seqs + 1, dtype=np.int64)
        np.cumsum(q_lens, out=cu[1:])
        num_tokens = int(cu[-1])
        if num_tokens == num_seqs:  # one token per sequence (decodes): no per-token work at all
            token_ids = [e.seq.token_ids[e.num_computed_tokens] for e in entries]
            positions = starts
            seq_idx = np.arange(num_seqs)
        else:
            token_ids = []
            for e in entries:
                token_ids.extend(e.seq.token_ids[e.num_computed_tokens : e.num_computed_tokens + e.num_new_tokens])
            seq_idx = np.repeat(np.arange(num_seqs), q_lens)  # [num_tokens]
            positions = np.arange(num_tokens) - np.repeat(cu[:-1] - starts, q_lens)  # [num_tokens]
        width = max(len(e.seq.block_table) for e in entries)
        tables = np.zeros((num_seqs, width), dtype=np.int32)  # [num_seqs, width]
        for i, e in enumerate(entries):
            tables[i, : len(e.seq.block_table)] = e.seq.block_table
        slots = tables[seq_idx, positions // bs].astype(np.int64) * bs + positions % bs  # [num_tokens]
        samples = np.fromiter((e.samples for e in entries), dtype=bool, count=num_seqs)
        logits_indices = cu[1:][samples] - 1
        if out.num_prompt_logit_rows:
            logits_indices = _logit_rows(entries, cu)
        rope_lengths = None
        if self.model_config.rope_length_rule is not None:  # longrope/dynamic: rotations by the sequence's length
            base_lens = np.fromiter((e.seq.rope_base_len for e in entries), dtype=np.int64, count=num_seqs)
            lengths = np.maximum(positions + 1, base_lens[seq_idx])  # [num_tokens]
            if (lengths != positions + 1).any():  # else the table's decode rows are right: no tensor to send
                rope_lengths = torch.from_numpy(lengths)
        return StepInputs(
            input_ids=torch.tensor(token_ids, dtype=torch.int64),
            positions=torch.from_numpy(positions),
            slot_mapping=torch.from_numpy(slots),
            query_start_loc=torch.from_numpy(cu.astype(np.int32)),
            seq_lens=torch.from_numpy(seq_lens.astype(np.int32)),
            block_tables=torch.from_numpy(tables),
            logits_indices=torch.from_numpy(logits_indices),
            max_query_len=int(q_lens.max()),
            max_seq_len=int(seq_lens.max()),
            rope_lengths=rope_lengths,
        )

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, patch: InputPatch | None = None) -> torch.Tensor:
        """Run one step; logits [num_rows, vocab] float32 of the sequences that sample, in order, each preceded
        by its prompt rows when it asked for prompt logprobs (only then is num_rows more than the samplers)."""
        inputs = self.prepare(out)
        if self.broadcast is None:
            return self.run(inputs, patch)
        if patch is not None:
            raise ValueError("input patches (async scheduling) need a single rank")
        try:
            self.broadcast.send(inputs)  # the other ranks run the same forward on their shards
            return self.run(inputs)
        except Exception:
            # The other ranks may be waiting in a collective this rank never reaches: no later step can run.
            self.workers.fail("a tensor-parallel step failed on rank 0", exc_info=True)

    @torch.inference_mode()
    def run(self, inputs: StepInputs, patch: InputPatch | None = None) -> torch.Tensor:
        """The forward of a prepared batch; decides from `inputs` alone, so every rank takes the same path."""
        graphs = self.graph_runner
        # (Graphs rotate by position alone: a one-token prompt chunk of a long longrope/dynamic prompt runs eagerly.)
        if (
            graphs is not None
            and inputs.max_query_len == 1
            and inputs.rope_lengths is None
            and graphs.can_run(inputs.num_seqs)
        ):
            hidden = graphs.run(
                inputs.input_ids, inputs.positions, inputs.slot_mapping, inputs.seq_lens, inputs.block_tables, patch
            )  # host tensors: the runner stages them itself
            if hidden.shape[0] != inputs.logits_indices.shape[0]:  # a one-token prompt chunk that samples nothing
                hidden = hidden[self._to_device(inputs.logits_indices)]
            return self._logits(hidden, inputs)
        return self._forward(inputs, self.kv_caches, patch)

    def serve_steps(self) -> None:
        """Ranks 1..N-1: run every step rank 0 sends until it says stop, then leave the group."""
        if self.broadcast is None or self.tp_rank == 0:
            raise RuntimeError("serve_steps runs on tensor-parallel ranks 1..N-1 only")
        while (inputs := self.broadcast.recv()) is not None:
            self.run(inputs)
        self.broadcast.close()
        self.broadcast = None

    def shutdown(self) -> None:
        """Rank 0: tell the other ranks to exit, wait for them, leave the group. Idempotent; also runs at exit."""
        if self.workers is not None and self.broadcast is not None:
            atexit.unregister(self.shutdown)
            self.workers.stop(self.broadcast)
        self.workers = self.broadcast = None

    def _abort(self) -> None:
        """Start-up failed on this rank: end the workers without a message (they may be in any collective)."""
        if self.workers is not None:
            self.workers.abort(self.broadcast)
        elif self.broadcast is not None:
            self.broadcast.close()
        self.workers = self.broadcast = None

    def _forward(
        self, inputs: StepInputs, kv_caches: list[kv_cache.KVCache], patch: InputPatch | None = None
    ) -> torch.Tensor:
        to = self._to_device
        metadata = AttentionMetadata(
            slot_mapping=to(inputs.slot_mapping),
            query_start_loc=to(inputs.query_start_loc),
            seq_lens=to(inputs.seq_lens),
            block_tables=to(inputs.block_tables),
            max_query_len=inputs.max_query_len,
            max_seq_len=inputs.max_seq_len,
            rope_lengths=None if inputs.rope_lengths is None else to(inputs.rope_lengths),
        )
        input_ids = to(inputs.input_ids)  # [T]
        if patch is not None:
            patch.apply(input_ids)
        num_sampling, num_tokens = inputs.logits_indices.shape[0], input_ids.shape[0]
        # Prompt tokens that sample nothing leave the last layer after its attention (their k/v is stored).
        # A step where nothing samples (a middle prefill chunk) runs in full rather than on zero rows.
        output_rows = to(inputs.logits_indices) if 0 < num_sampling < num_tokens else None
        hidden = self.model(input_ids, to(inputs.positions), kv_caches, metadata, output_rows)  # [T or N, hidden]
        return self._logits(hidden, inputs)

    def _logits(self, hidden: torch.Tensor, inputs: StepInputs) -> torch.Tensor:
        """[num_rows, vocab] float32 from the step's hidden states, already one row per `logits_indices` entry
        (decodes, or a forward given `output_rows`): each sampling sequence's last row, preceded by its prompt
        rows when it asked for prompt logprobs. A step where no row is read (a middle prefill chunk) skips the
        LM head; the choice depends on `inputs` only, so every rank skips its vocab all-gather alike."""
        if inputs.logits_indices.shape[0] == 0:
            return torch.empty(0, self.model_config.vocab_size, device=self.device)  # [0, vocab]
        if inputs.logits_indices.shape[0] != hidden.shape[0]:
            raise RuntimeError(f"{hidden.shape[0]} hidden rows for {inputs.logits_indices.shape[0]} sampling sequences")
        return self.model.compute_logits(hidden)  # [num_sampling, vocab]

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        return to_device(t, self.device)


def _logit_rows(entries: list, cu: np.ndarray) -> np.ndarray:
    """Flat rows whose logits a step reads, ascending: per sequence, the prompt positions it scores for prompt
    logprobs (`prompt_logits_start` on), then its last row when it samples."""
    rows: list[int] = []
    for i, e in enumerate(entries):
        if e.num_prompt_logit_rows:
            first = int(cu[i]) + e.prompt_logits_start - e.num_computed_tokens
            rows.extend(range(first, first + e.num_prompt_logit_rows))
        if e.samples:
            rows.append(int(cu[i + 1]) - 1)
    return np.asarray(rows, dtype=np.int64)


def run_tp_rank(rank: int, tp_size: int, config: EngineConfig, init_method: str, parent_pid: int) -> None:
    """Tensor-parallel rank `rank`'s process: load its shard, size and allocate its KV cache, then run every step
    rank 0 sends."""
    from model_handler import envs
    from model_handler.logging_setup import configure_logging

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C reaches the engine, which stops us
    configure_logging(envs.process_environ(), process=f"engine-rank{rank}")
    threading.Thread(target=exit_with_parent, args=(parent_pid,), name="parent-watch", daemon=True).start()
    if not config.device.startswith("cuda"):
        # CPU ranks share the cores; without this each would start one thread per core.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // tp_size))
    runner = ModelRunner(config, config.model(), tp_rank=rank, tp_size=tp_size, tp_init_method=init_method)
    runner.serve_steps()
    logger.info("tensor-parallel worker stopped", extra={"rank": rank})
