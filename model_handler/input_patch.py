"""Async scheduling: input tokens that are still on the device, sampled by the step launched before."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model_handler.host_to_device import to_device


@dataclass(slots=True)
class InputPatch:
    """input_ids[rows] = source[source_rows], applied on the device before a step's forward."""

    rows: torch.Tensor  # [P] int64, host: positions in this step's flat token batch
    source_rows: torch.Tensor  # [P] int64, host: rows of `source`
    source: torch.Tensor  # [num_sampled] int64 on the device: the previous step's sampled token ids

    def apply(self, input_ids: torch.Tensor) -> None:
        """Fill the placeholders of `input_ids` (this step's ids, on the device) in place."""
        device = input_ids.device
        values = self.source.index_select(0, to_device(self.source_rows, device))  # [P]
        input_ids.index_copy_(0, to_device(self.rows, device), values)
