"""HeadParallelLinear: one attention projection (q, k or v on its own) split across ranks by whole heads.

Hugging Face attention modules call q_proj, k_proj and v_proj separately, so `tp_kernels.parallelize`
cannot swap in the fused QKVParallelLinear without rewriting their forward. This layer is the separate
counterpart: the same head assignment as QKVParallelLinear, one projection at a time, including the
replication of KV heads when the TP degree exceeds their number.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn

from tp_kernels.distributed import TPGroup
from tp_kernels.layers import ColumnParallelLinear, divide

__all__ = ["HeadParallelLinear", "heads_of_rank"]


def heads_of_rank(n_heads: int, tp: TPGroup, what: str) -> Tuple[int, int]:
    """(first head, number of heads) that rank tp.rank holds of a projection with n_heads heads.

    With p = tp.world_size <= n_heads the heads are split evenly: rank r holds [r * n / p, (r+1) * n / p).
    With p > n_heads (the KV heads of a grouped-query model) every head is replicated on p / n_heads
    consecutive ranks, so rank r holds head r // (p / n_heads): the KV head that rank r's query heads
    [r * n_q / p, (r+1) * n_q / p) belong to, since query head h uses KV head h // (n_q / n_heads).
    `what` names the projection in the error when neither split is possible.
    """
    p = tp.world_size
    if p <= n_heads:
        n_heads_per_rank = divide(n_heads, p, f"{what}: n_heads ({n_heads}) across tp={p} ranks")
        return tp.rank * n_heads_per_rank, n_heads_per_rank
    ranks_per_head = divide(p, n_heads, f"{what}: tp={p} ranks sharing n_heads ({n_heads}) replicated heads")
    return tp.rank // ranks_per_head, 1


class HeadParallelLinear(ColumnParallelLinear):
    """A linear layer whose output features are n_heads heads of head_dim features, split by heads.

    W = [W_1; ...; W_p] by heads: rank r holds the rows of its heads (see `heads_of_rank`), with bias, and
    computes Y_r = X W_r^T + b_r, the features of its heads. No communication: the attention that follows
    works on this rank's heads only. When tp exceeds n_heads, each head's rows are held by tp / n_heads
    ranks (replication), so p * out_features_per_rank exceeds out_features.
    """

    def __init__(self, in_features: int, head_dim: int, n_heads: int, bias: bool, tp: TPGroup, *,
                 dtype: Optional[torch.dtype] = None, device=None, what: str = "HeadParallelLinear"):
        if not isinstance(tp, TPGroup):
            raise TypeError(f"tp must be a tp_kernels.TPGroup, got {type(tp).__name__}")
        if head_dim < 1 or n_heads < 1:
            raise ValueError(f"{what}: head_dim and n_heads must be >= 1, got {head_dim}, {n_heads}")
        self.head_dim, self.n_heads = head_dim, n_heads
        self.head_start, self.n_heads_per_rank = heads_of_rank(n_heads, tp, what)
        # The base class splits out_features evenly across ranks; with replication the per-rank size is
        # fixed by the heads instead, so build on the size that gives it and set the true full size after.
        super().__init__(in_features, self.n_heads_per_rank * head_dim * tp.world_size, bias, tp,
                         dtype=dtype, device=device)
        self.out_features = n_heads * head_dim

    def _row_range(self) -> Tuple[int, int]:
        start = self.head_start * self.head_dim
        return start, start + self.n_heads_per_rank * self.head_dim

    @classmethod
    def from_linear(cls, linear: nn.Linear, tp: TPGroup, *, head_dim: int) -> "HeadParallelLinear":
        """From a full nn.Linear whose out_features are whole heads of head_dim features."""
        n_heads = divide(linear.out_features, head_dim, f"out_features ({linear.out_features}) into heads of head_dim")
        layer = cls(linear.in_features, head_dim, n_heads, linear.bias is not None, tp,
                    dtype=linear.weight.dtype, device=linear.weight.device)
        layer.load_full(linear.weight, linear.bias)
        return layer

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, n_heads={self.n_heads} (heads {self.head_start}.."
                f"{self.head_start + self.n_heads_per_rank - 1} on this rank), head_dim={self.head_dim}, "
                f"bias={self.bias is not None}, tp={self.tp.world_size}")
