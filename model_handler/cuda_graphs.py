"""CUDA graphs for decode steps: one graph per batch size of a ladder, replayed with the batch padded up.

Padding rows compute nothing that matters: slot -1 (their k/v are not stored), context length 0
(the attention kernel writes zeros), block table 0. Prefill and mixed steps run eagerly.

A step's inputs arrive on the host. They are written into pinned staging buffers that mirror the static
ones and copied straight into them: one host-to-device copy per buffer, no per-step pinned allocation and
no device-side copy kernels, so the host gets to `replay()` sooner (at batch 1 the host's work between
two steps is time the GPU sits idle).
"""

from __future__ import annotations

import bisect
import logging

import torch

from model_handler.input_patch import InputPatch
from model_handler.kv_cache import KVCache
from model_handler.layers.attention_metadata import AttentionMetadata

logger = logging.getLogger(__name__)


class CudaGraphRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        kv_caches: list[KVCache],
        batch_sizes: list[int],
        max_blocks_per_seq: int,
        max_model_len: int,
        hidden_size: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.batch_sizes = sorted(set(batch_sizes))
        self.max_model_len = max_model_len
        max_bs = self.batch_sizes[-1]
        # Static buffers every graph reads and writes; replay copies a step's inputs into their heads.
        self.input_ids = torch.zeros(max_bs, dtype=torch.int64, device=device)  # [max_bs]
        self.positions = torch.zeros(max_bs, dtype=torch.int64, device=device)  # [max_bs]
        self.slot_mapping = torch.full((max_bs,), -1, dtype=torch.int64, device=device)  # [max_bs]
        self.seq_lens = torch.zeros(max_bs, dtype=torch.int32, device=device)  # [max_bs]
        self.query_start_loc = torch.arange(max_bs + 1, dtype=torch.int32, device=device)  # one token per row
        self.block_tables = torch.zeros(max_bs, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.hidden = torch.zeros(max_bs, hidden_size, dtype=dtype, device=device)  # [max_bs, hidden]
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._capture_all()
        # Pinned host mirrors of the input buffers (numpy views for cheap writes), and an event that marks
        # when the last step's copies out of them are done, so the next step never overwrites them early.
        inputs = (self.input_ids, self.positions, self.slot_mapping, self.seq_lens, self.block_tables)
        self._staging = [torch.zeros_like(t, device="cpu").pin_memory() for t in inputs]
        self._staging_np = [t.numpy() for t in self._staging]
        self._staged = torch.cuda.Event()
        self._staged.record()

    def _metadata(self, batch_size: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:batch_size],
            query_start_loc=self.query_start_loc[: batch_size + 1],
            seq_lens=self.seq_lens[:batch_size],
            block_tables=self.block_tables[:batch_size],
            max_query_len=1,
            max_seq_len=self.max_model_len,  # static: a graph must not depend on this step's lengths
        )

    def _forward(self, batch_size: int) -> None:
        self.hidden[:batch_size] = self.model(
            self.input_ids[:batch_size], self.positions[:batch_size], self.kv_caches, self._metadata(batch_size)
        )

    @torch.inference_mode()
    def _capture_all(self) -> None:
        pool = None
        # Largest first, so the smaller graphs fit in the memory pool the largest one reserved.
        for batch_size in reversed(self.batch_sizes):
            self._forward(batch_size)  # compiles the kernels outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._forward(batch_size)
            pool = graph.pool()
            self.graphs[batch_size] = graph
        torch.cuda.synchronize()
        logger.info("captured decode CUDA graphs for batch sizes %s", self.batch_sizes)

    def can_run(self, num_seqs: int) -> bool:
        return num_seqs <= self.batch_sizes[-1]

    def run(
        self,
        input_ids: torch.Tensor,  # [n] int64, on the host
        positions: torch.Tensor,  # [n] int64
        slot_mapping: torch.Tensor,  # [n] int64
        seq_lens: torch.Tensor,  # [n] int32
        block_tables: torch.Tensor,  # [n, width] int32
        patch: InputPatch | None = None,
    ) -> torch.Tensor:
        """Decode hidden states of `n` one-token sequences: [n, hidden] (a view into the static output).

        `patch` (async scheduling) fills in, on the device, input ids the previous step sampled."""
        n = input_ids.shape[0]
        batch_size = self.batch_sizes[bisect.bisect_left(self.batch_sizes, n)]
        ids, pos, slots, lens, tables = self._staging_np
        self._staged.synchronize()  # normally done: they ran right after the step the host last waited for
        ids[:n], pos[:n], slots[:n] = input_ids.numpy(), positions.numpy(), slot_mapping.numpy()
        lens[:n] = seq_lens.numpy()
        ids[n:batch_size], pos[n:batch_size], slots[n:batch_size], lens[n:batch_size] = 0, 0, -1, 0
        # Entries past a row's width are stale but never read: they lie beyond its context length.
        tables[:n, : block_tables.shape[1]] = block_tables.numpy()
        statics = (self.input_ids, self.positions, self.slot_mapping, self.seq_lens, self.block_tables)
        for static, staged in zip(statics, self._staging):
            static[:batch_size].copy_(staged[:batch_size], non_blocking=True)
        self._staged.record()
        if patch is not None:
            patch.apply(self.input_ids[:n])
        self.graphs[batch_size].replay()
        return self.hidden[:n]
