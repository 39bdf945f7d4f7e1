"""Vocab-parallel token embedding and LM head: each rank owns a contiguous slice of the vocabulary.

The vocabulary is padded up to a multiple of tp_size; padded rows are zero and padded logits are cut off,
so `compute_logits` always returns exactly `vocab_size` columns.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model_handler.distributed import all_gather_last_dim, all_reduce
from model_handler.layers.cpu_linear import PackedWeight
from model_handler.layers.matmul import linear


class VocabParallelEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int, *, tp_rank: int = 0, tp_size: int = 1) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.num_embeddings_per_rank = -(-num_embeddings // tp_size)
        self.vocab_start = tp_rank * self.num_embeddings_per_rank
        self.weight = nn.Parameter(torch.empty(self.num_embeddings_per_rank, embedding_dim), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: object = None) -> None:
        if loaded_weight.shape != (self.num_embeddings, param.shape[1]):
            raise ValueError(
                f"checkpoint tensor has shape {tuple(loaded_weight.shape)}, "
                f"expected {(self.num_embeddings, param.shape[1])}"
            )
        rows = max(0, min(self.num_embeddings_per_rank, self.num_embeddings - self.vocab_start))
        param.detach().zero_()
        param.detach()[:rows].copy_(loaded_weight[self.vocab_start : self.vocab_start + rows])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)  # [num_tokens, hidden]
        local_ids = input_ids - self.vocab_start
        is_local = (local_ids >= 0) & (local_ids < self.num_embeddings_per_rank)  # [num_tokens]
        embedded = F.embedding(local_ids.masked_fill(~is_local, 0), self.weight)  # [num_tokens, hidden]
        return all_reduce(embedded.masked_fill_(~is_local.unsqueeze(1), 0))


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection; shares its Parameter with the embedding when embeddings are tied."""

    def __init__(self, num_embeddings: int, embedding_dim: int, *, tp_rank: int = 0, tp_size: int = 1) -> None:
        super().__init__(num_embeddings, embedding_dim, tp_rank=tp_rank, tp_size=tp_size)
        self.packed_weight = PackedWeight()  # oneDNN's copy of the weight, made on the first CPU forward

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = linear(hidden, self.weight, None, self.packed_weight)  # [N, vocab_per_rank]
        if self.tp_size > 1:
            logits = all_gather_last_dim(logits, self.tp_size)[:, : self.num_embeddings]  # [N, vocab]
        return logits.float()
