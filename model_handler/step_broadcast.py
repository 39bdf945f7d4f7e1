"""One step's flat batch (`StepInputs`) and the control channel that carries it from rank 0 to the other
tensor-parallel ranks, so every rank runs its shard of the same forward.

The channel is a gloo group of its own, separate from the group the layers all-reduce on (NCCL on CUDA):
a worker waits on it between steps for as long as the server idles, so it gets a very long timeout, while
the model's collectives keep torch's short one. The batch is built on the host anyway, so sending it over
gloo costs no extra device copy; each rank then copies it to its own device.
"""

from __future__ import annotations

import datetime
import shutil
import tempfile
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

import torch
import torch.distributed as dist

MODEL_GROUP_TIMEOUT = datetime.timedelta(minutes=10)
"""How long a collective inside the forward may wait for a peer (NCCL's watchdog then ends the process)."""
CONTROL_GROUP_TIMEOUT = datetime.timedelta(days=3650)
"""Workers wait for the next step on the control group while the server idles: effectively forever."""
_HEADER_SIZE = 8


class MessageKind(IntEnum):
    STOP = 0
    STEP = 1


@dataclass(slots=True)
class StepInputs:
    """One step's flat batch on the host, in scheduling order."""

    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64
    slot_mapping: torch.Tensor  # [num_tokens] int64
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    seq_lens: torch.Tensor  # [num_seqs] int32
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32
    logits_indices: torch.Tensor  # [num_rows] int64, ascending: rows that sample, and prompt-logprob rows
    max_query_len: int
    max_seq_len: int
    rope_lengths: torch.Tensor | None = None  # [num_tokens] int64 (AttentionMetadata.rope_lengths), or None

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]


def new_init_method() -> tuple[str, Path]:
    """A fresh file rendezvous for one tensor-parallel group (every rank is on this machine); its folder."""
    directory = Path(tempfile.mkdtemp(prefix="tp-group-"))
    return f"file://{directory / 'store'}", directory


class StepBroadcast:
    """This rank's membership of the tensor-parallel group: rank 0 sends steps, the others receive them."""

    def __init__(self, rank: int, world_size: int, control_group: dist.ProcessGroup) -> None:
        self.rank = rank
        self.world_size = world_size
        self._group = control_group
        self._header = torch.zeros(_HEADER_SIZE, dtype=torch.int64)  # [kind, T, S, W, N, max_q, max_seq, rope]

    @classmethod
    def join(cls, rank: int, world_size: int, init_method: str, device: torch.device) -> StepBroadcast:
        """Join the default group the layers reduce on, and create the control group (collective: every
        rank calls this once, in the same order)."""
        if dist.is_initialized():
            raise RuntimeError(
                "this process already belongs to a torch.distributed group: one tensor-parallel engine per process"
            )
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend, init_method=init_method, rank=rank, world_size=world_size, timeout=MODEL_GROUP_TIMEOUT
        )
        control = dist.new_group(backend="gloo", timeout=CONTROL_GROUP_TIMEOUT)
        return cls(rank, world_size, control)

    # ---- rank 0 ----------------------------------------------------------------------------------

    def send(self, inputs: StepInputs) -> None:
        num_seqs, width = inputs.block_tables.shape
        header = self._header
        header[0] = MessageKind.STEP
        header[1] = inputs.input_ids.shape[0]
        header[2] = num_seqs
        header[3] = width
        header[4] = inputs.logits_indices.shape[0]
        header[5] = inputs.max_query_len
        header[6] = inputs.max_seq_len
        header[7] = inputs.rope_lengths is not None
        dist.broadcast(header, 0, group=self._group)
        rope_lengths = [] if inputs.rope_lengths is None else [inputs.rope_lengths]
        payload = torch.cat(
            [
                inputs.input_ids,
                inputs.positions,
                inputs.slot_mapping,
                inputs.query_start_loc.to(torch.int64),
                inputs.seq_lens.to(torch.int64),
                inputs.block_tables.reshape(-1).to(torch.int64),
                inputs.logits_indices,
                *rope_lengths,
            ]
        )  # [3 * T + 2 * S + 1 + S * W + N (+ T)] int64
        dist.broadcast(payload, 0, group=self._group)

    def send_stop(self) -> None:
        self._header.zero_()  # kind STOP
        dist.broadcast(self._header, 0, group=self._group)

    # ---- ranks 1..N-1 ----------------------------------------------------------------------------

    def recv(self) -> StepInputs | None:
        """The next step rank 0 runs, or None when rank 0 says stop."""
        header = self._header
        dist.broadcast(header, 0, group=self._group)
        kind, num_tokens, num_seqs, width, num_sampling, max_query_len, max_seq_len, has_rope = header.tolist()
        if kind == MessageKind.STOP:
            return None
        sizes = [num_tokens, num_tokens, num_tokens, num_seqs + 1, num_seqs, num_seqs * width, num_sampling]
        sizes += [num_tokens] if has_rope else []
        payload = torch.empty(sum(sizes), dtype=torch.int64)
        dist.broadcast(payload, 0, group=self._group)
        input_ids, positions, slots, query_start_loc, seq_lens, tables, logits_indices, *rope = payload.split(sizes)
        return StepInputs(
            input_ids=input_ids,
            positions=positions,
            slot_mapping=slots,
            query_start_loc=query_start_loc.to(torch.int32),
            seq_lens=seq_lens.to(torch.int32),
            block_tables=tables.to(torch.int32).view(num_seqs, width),  # [num_seqs, width]
            logits_indices=logits_indices,
            max_query_len=max_query_len,
            max_seq_len=max_seq_len,
            rope_lengths=rope[0] if rope else None,
        )

    # ---- every rank ------------------------------------------------------------------------------

    def barrier(self) -> None:
        """Wait for every rank (on the control group, so a slow model load does not hit the model timeout)."""
        dist.barrier(group=self._group)

    def min_over_ranks(self, value: int) -> int:
        """The smallest of every rank's `value`: the KV block count all ranks can hold."""
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self._group)
        return int(t.item())

    def close(self, rendezvous_dir: Path | None = None) -> None:
        """Leave the groups, so this process could join another one later."""
        if dist.is_initialized():
            dist.destroy_process_group()
        if rendezvous_dir is not None:
            shutil.rmtree(rendezvous_dir, ignore_errors=True)
