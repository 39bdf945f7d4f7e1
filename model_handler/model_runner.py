"""ModelRunner: the model and its KV cache on one device; a SchedulerOutput in, the sampled rows' logits out.

Each step's flat batch (all sequences' new tokens concatenated) is built with a handful of numpy ops, not
per-token Python: on CPU this is the hot loop of small models.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from model_handler import kv_cache
from model_handler.config import EngineConfig
from model_handler.cuda_graphs import CudaGraphRunner
from model_handler.kernels import select_backend
from model_handler.layers.attention_metadata import AttentionMetadata
from model_handler.model_config import ModelConfig
from model_handler.model_loader import load_model
from model_handler.scheduler import SchedulerOutput

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class StepInputs:
    """One step's flat batch on the host (pinned on CUDA), in scheduling order."""

    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64
    slot_mapping: torch.Tensor  # [num_tokens] int64
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    seq_lens: torch.Tensor  # [num_seqs] int32
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32
    logits_indices: torch.Tensor  # [num_sampling] int64: the last new token of each sampling sequence
    max_query_len: int
    max_seq_len: int


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class ModelRunner:
    def __init__(
        self, config: EngineConfig, model_config: ModelConfig, tp_rank: int = 0, tp_size: int = 1
    ) -> None:
        self.config = config
        self.model_config = model_config
        self.device = torch.device(config.device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())  # memory queries need an index
        self.dtype = config.torch_dtype
        self.block_size = config.block_size
        self.max_blocks_per_seq = _cdiv(config.max_model_len, config.block_size)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.backend = select_backend(self.device, config.attention_backend)
        self.model = load_model(
            config.model_dir,
            dtype=self.dtype,
            device=self.device,
            attention_backend=self.backend,
            tp_rank=tp_rank,
            tp_size=tp_size,
        )
        self.num_kv_heads = self.model.num_kv_heads_per_rank
        self.block_bytes = kv_cache.block_bytes(
            model_config.num_layers, self.block_size, self.num_kv_heads, model_config.head_dim, self.dtype
        )
        self.num_kv_blocks = self._size_kv_cache()
        self.kv_cache_bytes = self.num_kv_blocks * self.block_bytes
        self._cache, self.kv_caches = self._allocate(self.num_kv_blocks)
        logger.info(
            "KV cache: %d blocks of %d tokens (%.1f MiB)",
            self.num_kv_blocks, self.block_size, self.kv_cache_bytes / 2**20,
        )  # fmt: skip
        self.graph_runner: CudaGraphRunner | None = None
        if self.device.type == "cuda" and config.cuda_graph_sizes:
            self.graph_runner = CudaGraphRunner(
                self.model,
                self.kv_caches,
                config.cuda_graph_sizes,
                self.max_blocks_per_seq,
                config.max_model_len,
                model_config.hidden_size,
                self.dtype,
                self.device,
            )

    # ---- start-up ---------------------------------------------------------------------------------

    def _allocate(self, num_blocks: int) -> tuple[torch.Tensor, list[kv_cache.KVCache]]:
        cfg = self.model_config
        return kv_cache.allocate(
            cfg.num_layers, num_blocks, self.block_size, self.num_kv_heads, cfg.head_dim, self.dtype, self.device
        )

    def _size_kv_cache(self) -> int:
        config = self.config
        if self.device.type != "cuda":
            max_useful = config.max_num_seqs * self.max_blocks_per_seq
            num_blocks = kv_cache.num_cpu_blocks(config.kv_cache_cpu_bytes, self.block_bytes, max_useful)
            self._warm_up(min(config.max_num_batched_tokens, 256), num_seqs=4)  # first-call costs, off the clock
            return num_blocks
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        scratch_bytes = self._warm_up(config.max_num_batched_tokens, num_seqs=config.max_num_seqs)
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        return kv_cache.num_cuda_blocks(self.device, config.cuda_memory_fraction, self.block_bytes, scratch_bytes)

    @torch.inference_mode()
    def _warm_up(self, num_tokens: int, num_seqs: int) -> int:
        """A forward of `num_tokens` prompt tokens over `num_seqs` sequences, plus their logits and sampling
        temporaries, on a scratch cache; returns the scratch cache's bytes."""
        from model_handler.sampler import Sampler
        from model_handler.request import EngineRequest
        from model_handler.sampling_params import SamplingParams
        from model_handler.sequence import Sequence

        max_len = self.config.max_model_len
        num_seqs = max(min(num_seqs, num_tokens), _cdiv(num_tokens, max_len))
        lens = [num_tokens // num_seqs + (i < num_tokens % num_seqs) for i in range(num_seqs)]
        num_blocks = sum(_cdiv(n, self.block_size) for n in lens)
        scratch, caches = self._allocate(num_blocks)
        tables = np.zeros((num_seqs, self.max_blocks_per_seq), dtype=np.int32)
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
        # The sampler's worst case: top-k/top-p sorts and penalty counts over the whole vocabulary.
        params = SamplingParams(temperature=1.0, top_k=50, top_p=0.9, repetition_penalty=1.1, max_tokens=1)
        dummy = [Sequence(EngineRequest(f"warmup-{i}", [0], params)) for i in range(num_seqs)]
        Sampler(self.device)(logits, dummy)
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
        return StepInputs(
            input_ids=torch.tensor(token_ids, dtype=torch.int64),
            positions=torch.from_numpy(positions),
            slot_mapping=torch.from_numpy(slots),
            query_start_loc=torch.from_numpy(cu.astype(np.int32)),
            seq_lens=torch.from_numpy(seq_lens.astype(np.int32)),
            block_tables=torch.from_numpy(tables),
            logits_indices=torch.from_numpy(cu[1:][samples] - 1),
            max_query_len=int(q_lens.max()),
            max_seq_len=int(seq_lens.max()),
        )

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> torch.Tensor:
        """Run one step; logits [num_sampling, vocab] float32 of the sequences that sample, in order."""
        inputs = self.prepare(out)
        graphs = self.graph_runner
        if graphs is not None and inputs.max_query_len == 1 and graphs.can_run(len(out.scheduled)):
            to = self._to_device
            hidden = graphs.run(
                to(inputs.input_ids), to(inputs.positions), to(inputs.slot_mapping), to(inputs.seq_lens),
                to(inputs.block_tables),
            )  # fmt: skip
            return self.model.compute_logits(hidden[to(inputs.logits_indices)])
        return self._forward(inputs, self.kv_caches)

    def _forward(self, inputs: StepInputs, kv_caches: list[kv_cache.KVCache]) -> torch.Tensor:
        to = self._to_device
        metadata = AttentionMetadata(
            slot_mapping=to(inputs.slot_mapping),
            query_start_loc=to(inputs.query_start_loc),
            seq_lens=to(inputs.seq_lens),
            block_tables=to(inputs.block_tables),
            max_query_len=inputs.max_query_len,
            max_seq_len=inputs.max_seq_len,
        )
        hidden = self.model(to(inputs.input_ids), to(inputs.positions), kv_caches, metadata)  # [T, hidden]
        return self.model.compute_logits(hidden[to(inputs.logits_indices)])  # [num_sampling, vocab]

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cpu":
            return t
        return t.pin_memory().to(self.device, non_blocking=True)
