"""Attention projections split by whole heads: the fused QKVParallelLinear (split, then shard, as
tp_kernels.ops.qkv_rope expects its weight) and HeadParallelLinear, one projection (q, k or v) on its own.

Hugging Face attention modules call q_proj, k_proj and v_proj separately, so `tp_kernels.parallelize`
cannot swap in the fused QKVParallelLinear without rewriting their forward; HeadParallelLinear is the
separate counterpart. Both take their heads from `heads_of_rank`, which also replicates KV heads when the
TP degree exceeds their number.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn as nn

from tp_kernels.distributed import TPGroup
from tp_kernels.layers.linear import ColumnParallelLinear
from tp_kernels.layers.sharding import (check_bias_given, check_size, check_tp, copy_into, divide, expect_shape,
                                        rows_of)


def heads_of_rank(n_heads: int, tp: TPGroup, what: str, count_name: str = "n_heads") -> Tuple[int, int]:
    """(first head, number of heads) that rank tp.rank holds of a projection with n_heads heads.

    With p = tp.world_size <= n_heads the heads are split evenly: rank r holds [r * n / p, (r+1) * n / p).
    With p > n_heads (the KV heads of a grouped-query model) every head is replicated on p / n_heads
    consecutive ranks, so rank r holds head r // (p / n_heads): the KV head that rank r's query heads
    [r * n_q / p, (r+1) * n_q / p) belong to, since query head h uses KV head h // (n_q / n_heads).
    `what` names the projection and `count_name` the head count in the error when neither split is possible.
    """
    p = tp.world_size
    if p <= n_heads:
        n_heads_per_rank = divide(n_heads, p, f"{what}: {count_name} ({n_heads}) across tp={p} ranks")
        return tp.rank * n_heads_per_rank, n_heads_per_rank
    ranks_per_head = divide(p, n_heads, f"{what}: tp={p} ranks sharing {count_name} ({n_heads}) replicated heads")
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
        tp = check_tp(tp)
        self.head_dim = check_size(f"{what}: head_dim", head_dim)
        self.n_heads = check_size(f"{what}: n_heads", n_heads)
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


class QKVParallelLinear(ColumnParallelLinear):
    """The fused q, k, v projection split by attention heads.

    The full weight stacks W_q (n_heads * head_dim rows), W_k and W_v (n_kv_heads * head_dim rows each).
    It is split into q, k and v first, each is sharded by heads, and this rank's slices are concatenated:
    rank r holds [W_q heads of r; W_k heads of r; W_v heads of r], the layout tp_kernels.ops.qkv_rope
    expects. When tp exceeds n_kv_heads, KV heads are replicated: each KV head serves tp / n_kv_heads
    consecutive ranks, and every rank holds one.
    """

    def __init__(self, hidden_size: int, head_dim: int, n_heads: int, n_kv_heads: int, bias: bool, tp: TPGroup,
                 *, dtype: Optional[torch.dtype] = None, device=None):
        tp = check_tp(tp)
        for name, value in (("hidden_size", hidden_size), ("head_dim", head_dim), ("n_heads", n_heads),
                            ("n_kv_heads", n_kv_heads)):
            check_size(f"QKVParallelLinear: {name}", value)
        self.head_dim, self.n_heads, self.n_kv_heads = head_dim, n_heads, n_kv_heads
        self.n_heads_per_rank = divide(n_heads, tp.world_size, f"n_heads ({n_heads}) across tp={tp.world_size} ranks")
        divide(n_heads, n_kv_heads, f"n_heads ({n_heads}) into groups of n_kv_heads ({n_kv_heads})")
        self.kv_head_start, self.n_kv_heads_per_rank = heads_of_rank(n_kv_heads, tp, "QKVParallelLinear", "n_kv_heads")
        out_per_rank = (self.n_heads_per_rank + 2 * self.n_kv_heads_per_rank) * head_dim
        # The base class shards out_features evenly; here the per-rank size is what it is (KV replication
        # makes p * out_per_rank exceed the full size), so build on a one-rank view and fix the sizes.
        super().__init__(hidden_size, out_per_rank * tp.world_size, bias, tp, dtype=dtype, device=device)
        self.out_features = (n_heads + 2 * n_kv_heads) * head_dim

    def _head_rows(self) -> List[Tuple[int, int, int]]:
        """(offset of the q/k/v block in the full weight, this rank's start, stop within it)."""
        hd = self.head_dim
        q_start = self.tp.rank * self.n_heads_per_rank * hd
        kv_start = self.kv_head_start * hd
        kv_rows = self.n_kv_heads_per_rank * hd
        q_full, kv_full = self.n_heads * hd, self.n_kv_heads * hd
        return [(0, q_start, q_start + self.n_heads_per_rank * hd),
                (q_full, kv_start, kv_start + kv_rows),
                (q_full + kv_full, kv_start, kv_start + kv_rows)]

    def load_full(self, weight, bias=None) -> None:
        """From the fused full weight ((n_heads + 2 n_kv_heads) * head_dim, hidden_size), rows [q; k; v]."""
        expect_shape("weight", weight, (self.out_features, self.in_features))
        check_bias_given(bias, self.bias)
        rows = self._head_rows()
        copy_into(self.weight, torch.cat([rows_of(weight, o + a, o + b) for o, a, b in rows]), "weight")
        if bias is not None:
            expect_shape("bias", bias, (self.out_features,))
            copy_into(self.bias, torch.cat([rows_of(bias, o + a, o + b) for o, a, b in rows]), "bias")

    def load_full_qkv(self, q_weight, k_weight, v_weight, q_bias=None, k_bias=None, v_bias=None) -> None:
        """From separate full q, k, v weights (as Llama checkpoints store them) and optional biases."""
        hd = self.head_dim
        for name, t, n in (("q_weight", q_weight, self.n_heads), ("k_weight", k_weight, self.n_kv_heads),
                           ("v_weight", v_weight, self.n_kv_heads)):
            expect_shape(name, t, (n * hd, self.in_features))
        biases = (q_bias, k_bias, v_bias)
        if any(b is None for b in biases) != all(b is None for b in biases):
            raise ValueError("give all of q_bias, k_bias, v_bias or none of them")
        if (q_bias is None) != (self.bias is None):
            raise ValueError(f"biases given: {q_bias is not None}, but the layer was built with bias={self.bias is not None}")
        rows = self._head_rows()
        shards = [rows_of(t, a, b) for t, (_, a, b) in zip((q_weight, k_weight, v_weight), rows)]
        copy_into(self.weight, torch.cat(shards), "weight")
        if q_bias is not None:
            for name, t, n in (("q_bias", q_bias, self.n_heads), ("k_bias", k_bias, self.n_kv_heads),
                               ("v_bias", v_bias, self.n_kv_heads)):
                expect_shape(name, t, (n * hd,))
            copy_into(self.bias, torch.cat([rows_of(t, a, b) for t, (_, a, b) in zip(biases, rows)]), "bias")

    @classmethod
    def from_linear(cls, linear: nn.Linear, tp: TPGroup, *, head_dim: int, n_heads: int,
                    n_kv_heads: int) -> "QKVParallelLinear":
        """From one fused nn.Linear with output rows [q; k; v]."""
        layer = cls(linear.in_features, head_dim, n_heads, n_kv_heads, linear.bias is not None, tp,
                    dtype=linear.weight.dtype, device=linear.weight.device)
        layer.load_full(linear.weight, linear.bias)
        return layer

    @classmethod
    def from_linears(cls, q_proj: nn.Linear, k_proj: nn.Linear, v_proj: nn.Linear, tp: TPGroup, *,
                     head_dim: int) -> "QKVParallelLinear":
        """From separate q, k, v nn.Linear modules."""
        n_heads = divide(q_proj.out_features, head_dim, f"q_proj.out_features ({q_proj.out_features}) by head_dim")
        n_kv_heads = divide(k_proj.out_features, head_dim, f"k_proj.out_features ({k_proj.out_features}) by head_dim")
        layer = cls(q_proj.in_features, head_dim, n_heads, n_kv_heads, q_proj.bias is not None, tp,
                    dtype=q_proj.weight.dtype, device=q_proj.weight.device)
        biases = (q_proj.bias, k_proj.bias, v_proj.bias) if q_proj.bias is not None else (None, None, None)
        layer.load_full_qkv(q_proj.weight, k_proj.weight, v_proj.weight, *biases)
        return layer

    def split_heads(self, qkv: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's projection (..., (n_heads_per_rank + 2 n_kv_heads_per_rank) * head_dim) ->
        q (..., n_heads_per_rank, head_dim), k and v (..., n_kv_heads_per_rank, head_dim)."""
        hd = self.head_dim
        q, k, v = qkv.split([self.n_heads_per_rank * hd, self.n_kv_heads_per_rank * hd,
                             self.n_kv_heads_per_rank * hd], dim=-1)
        lead = qkv.shape[:-1]
        return (q.reshape(*lead, self.n_heads_per_rank, hd), k.reshape(*lead, self.n_kv_heads_per_rank, hd),
                v.reshape(*lead, self.n_kv_heads_per_rank, hd))

    def extra_repr(self) -> str:
        return (f"hidden_size={self.in_features}, head_dim={self.head_dim}, n_heads={self.n_heads} "
                f"({self.n_heads_per_rank} per rank), n_kv_heads={self.n_kv_heads} ({self.n_kv_heads_per_rank} per "
                f"rank), bias={self.bias is not None}, tp={self.tp.world_size}")
