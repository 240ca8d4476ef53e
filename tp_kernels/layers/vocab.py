"""Embedding table and LM head split by vocabulary rows (padded to a multiple of the TP degree)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from tp_kernels import ops
from tp_kernels.distributed import TPGroup
from tp_kernels.layers.sharding import (check_bias_given, check_input, check_size, check_tp, expect_shape,
                                        init_linear_, rows_of)


class _VocabShard(nn.Module):
    """Rows of a (vocab_size, dim) table split across ranks; the vocabulary is padded to a multiple of p
    with zero rows so every rank holds vocab_size_per_rank rows: [r * v, (r+1) * v) of the padded table."""

    def __init__(self, vocab_size: int, dim: int, tp: TPGroup, dtype, device):
        super().__init__()
        self.tp = check_tp(tp)
        self.vocab_size, self.dim = check_size("vocab_size", vocab_size), check_size("dim", dim)
        self.vocab_size_per_rank = -(-vocab_size // tp.world_size)  # ceil
        self.vocab_size_padded = self.vocab_size_per_rank * tp.world_size
        self.vocab_start = tp.rank * self.vocab_size_per_rank
        self.weight = nn.Parameter(torch.empty(self.vocab_size_per_rank, dim, dtype=dtype, device=device))

    def _n_real_rows(self) -> int:
        """How many of this rank's rows are real vocabulary (the rest, if any, is padding)."""
        return max(0, min(self.vocab_size - self.vocab_start, self.vocab_size_per_rank))

    def _zero_padding_rows(self) -> None:
        with torch.no_grad():
            self.weight[self._n_real_rows():].zero_()

    def load_full(self, weight) -> None:
        """Keep this rank's rows of the full (vocab_size, dim) table; padding rows are zero."""
        expect_shape("weight", weight, (self.vocab_size, self.dim))
        n_real = self._n_real_rows()
        with torch.no_grad():
            if n_real:
                shard = rows_of(weight, self.vocab_start, self.vocab_start + n_real)
                self.weight[:n_real].copy_(shard.to(device=self.weight.device, dtype=self.weight.dtype))
        self._zero_padding_rows()

    def extra_repr(self) -> str:
        return (f"vocab_size={self.vocab_size} (padded {self.vocab_size_padded}, {self.vocab_size_per_rank} per "
                f"rank), dim={self.dim}, tp={self.tp.world_size}")


class VocabParallelEmbedding(_VocabShard):
    """Embedding table split by vocabulary rows. Each rank looks up the ids in its range (others give
    zero rows) and the all-reduce sums the ranks' results, so every rank gets every token's embedding."""

    def __init__(self, vocab_size: int, dim: int, tp: TPGroup, *, dtype: Optional[torch.dtype] = None, device=None):
        super().__init__(vocab_size, dim, tp, dtype, device)
        with torch.no_grad():
            nn.init.normal_(self.weight)  # nn.Embedding's default
        self._zero_padding_rows()

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, tp: TPGroup) -> "VocabParallelEmbedding":
        layer = cls(embedding.num_embeddings, embedding.embedding_dim, tp, dtype=embedding.weight.dtype,
                    device=embedding.weight.device)
        layer.load_full(embedding.weight)
        return layer

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"VocabParallelEmbedding: ids must be int32 or int64, got {ids.dtype}")
        if ids.device != self.weight.device:
            raise ValueError(f"VocabParallelEmbedding: ids are on {ids.device} but the weight is on {self.weight.device}")
        if ids.device.type == "cpu" and torch.compiler.is_compiling():
            # a traced graph cannot raise from values; this check runs inside the compiled code (RuntimeError)
            torch._assert_async(((ids >= 0) & (ids < self.vocab_size)).all(),
                                f"VocabParallelEmbedding: ids must be in [0, {self.vocab_size})")
        elif ids.device.type == "cpu" and ids.numel():
            lo, hi = int(ids.min()), int(ids.max())  # free on CPU; on GPU it would cost a sync per step
            if lo < 0 or hi >= self.vocab_size:
                raise ValueError(f"VocabParallelEmbedding: ids must be in [0, {self.vocab_size}), got [{lo}, {hi}]")
        local = ids - self.vocab_start
        in_range = (local >= 0) & (local < self.vocab_size_per_rank)
        rows = F.embedding(local.clamp(0, self.vocab_size_per_rank - 1), self.weight)  # (..., dim)
        rows = rows * in_range.unsqueeze(-1).to(rows.dtype)
        if torch.is_grad_enabled() and rows.requires_grad:
            return ops.all_reduce(rows, self.tp)  # differentiable (its gradient is the summed gradient)
        return ops.all_reduce_(rows, self.tp)  # rows is this rank's partial sum, dead afterwards: reduce in place


class ParallelLMHead(_VocabShard):
    """Output projection split by vocabulary rows: each rank computes the logits of its vocabulary slice,
    the slices are gathered, and the padding is cut, so every rank returns (..., vocab_size) logits.
    `tied_to(embedding)` shares the embedding's shard (the padding matches by construction)."""

    def __init__(self, vocab_size: int, dim: int, tp: TPGroup, bias: bool = False, *,
                 dtype: Optional[torch.dtype] = None, device=None):
        super().__init__(vocab_size, dim, tp, dtype, device)
        self.bias = nn.Parameter(torch.zeros(self.vocab_size_per_rank, dtype=dtype, device=device)) if bias else None
        init_linear_(self.weight, self.bias, dim)
        self._zero_padding_rows()

    def load_full(self, weight, bias=None) -> None:
        super().load_full(weight)
        check_bias_given(bias, self.bias)
        if bias is not None:
            expect_shape("bias", bias, (self.vocab_size,))
            n_real = self._n_real_rows()
            with torch.no_grad():
                self.bias.zero_()
                if n_real:
                    shard = rows_of(bias, self.vocab_start, self.vocab_start + n_real)
                    self.bias[:n_real].copy_(shard.to(self.bias.dtype))

    @classmethod
    def from_linear(cls, linear: nn.Linear, tp: TPGroup) -> "ParallelLMHead":
        layer = cls(linear.out_features, linear.in_features, tp, linear.bias is not None,
                    dtype=linear.weight.dtype, device=linear.weight.device)
        layer.load_full(linear.weight, linear.bias)
        return layer

    @classmethod
    def tied_to(cls, embedding: VocabParallelEmbedding) -> "ParallelLMHead":
        """A head that shares the embedding's weight Parameter (tied input and output embeddings)."""
        head = cls(embedding.vocab_size, embedding.dim, embedding.tp, dtype=embedding.weight.dtype, device="meta")
        head.weight = embedding.weight
        return head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(type(self).__name__, x, self.dim, self.weight)
        logits = F.linear(x, self.weight, self.bias)  # (..., vocab_size_per_rank)
        logits = ops.all_gather(logits, self.tp, dim=-1)  # (..., vocab_size_padded)
        return logits[..., :self.vocab_size]
