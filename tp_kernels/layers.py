"""Drop-in tensor-parallel layers.

Every layer takes its TPGroup explicitly, holds only this rank's shard of the weights, and can be built
from a full unsharded module (`from_linear` / `from_embedding`) or filled from full tensors
(`load_full`). `load_full` only slices its arguments with `t[a:b]`, so it accepts, besides tensors, the
lazy slices of `safetensors.safe_open(...).get_slice(name)`: a rank then reads only its own rows.

Notation: a linear layer computes Y = X A^T with A (out_features, in_features); p = tp.world_size and r
is this rank.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from tp_kernels import ops
from tp_kernels.distributed import TPGroup

__all__ = ["ColumnParallelLinear", "RowParallelLinear", "QKVParallelLinear", "MergedColumnParallelLinear",
           "VocabParallelEmbedding", "ParallelLMHead", "divide"]


# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------
def divide(numerator: int, denominator: int, what: str) -> int:
    """numerator / denominator, which must divide evenly; `what` names the quantities in the error."""
    if numerator % denominator:
        raise ValueError(f"{what}: {numerator} is not divisible by {denominator}")
    return numerator // denominator


def _full_shape(t) -> Tuple[int, ...]:
    """Shape of a tensor or of a safetensors slice (which has get_shape() instead of .shape)."""
    return tuple(t.shape) if isinstance(t, torch.Tensor) else tuple(t.get_shape())


def _expect_shape(name: str, t, expected: Tuple[int, ...]) -> None:
    if _full_shape(t) != tuple(expected):
        raise ValueError(f"{name} must have the full unsharded shape {tuple(expected)}, got {_full_shape(t)}")


def _rows(t, start: int, stop: int) -> torch.Tensor:
    return t[start:stop]


def _cols(t, start: int, stop: int) -> torch.Tensor:
    return t[:, start:stop]


def _copy_into(param: torch.Tensor, value: torch.Tensor, name: str) -> None:
    if tuple(value.shape) != tuple(param.shape):
        raise ValueError(f"{name}: shard has shape {tuple(value.shape)}, expected {tuple(param.shape)}")
    with torch.no_grad():
        param.copy_(value.to(device=param.device, dtype=param.dtype))


def _init_linear_(weight: torch.Tensor, bias: Optional[torch.Tensor], fan_in: int) -> None:
    """nn.Linear's default initialization, with the fan-in of the full (unsharded) layer."""
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    with torch.no_grad():
        nn.init.uniform_(weight, -bound, bound)
        if bias is not None:
            nn.init.uniform_(bias, -bound, bound)


def _check_tp(tp) -> TPGroup:
    if not isinstance(tp, TPGroup):
        raise TypeError(f"tp must be a tp_kernels.TPGroup, got {type(tp).__name__}")
    return tp


def _check_input(layer: str, x: torch.Tensor, in_features: int, weight: torch.Tensor) -> None:
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"{layer}: input must be (..., {in_features}), got shape {tuple(x.shape)}")
    if x.dtype != weight.dtype:
        raise ValueError(f"{layer}: input dtype {x.dtype} does not match the weight dtype {weight.dtype}")
    if x.device != weight.device:
        raise ValueError(f"{layer}: input is on {x.device} but the weight is on {weight.device}")


def _check_sequence_split(layer: str, x: torch.Tensor, tp: TPGroup) -> None:
    """Sequence parallelism splits the first (token) dimension T into p blocks of T / p."""
    if x.dim() < 2 or x.shape[0] % tp.world_size:
        raise ValueError(f"{layer}: with sequence_parallel=True the input must be (T, ..., features) with T "
                         f"divisible by tp={tp.world_size}, got shape {tuple(x.shape)}")


# ----------------------------------------------------------------------------------------------------------
# column parallel
# ----------------------------------------------------------------------------------------------------------
class ColumnParallelLinear(nn.Module):
    """Linear layer split along its output features.

    A = [A_1; ...; A_p] by rows: rank r holds A_r (out_features / p, in_features) and bias b_r, and
    computes Y_r = X A_r^T + b_r, its slice of the output features. No communication unless
    gather_output=True, which concatenates the Y_r so every rank holds Y.

    sequence_parallel=True: the input is this rank's block of tokens, X^(r) (T / p, ..., in_features),
    split along the first dimension; the blocks are gathered, X = [X^(1); ...; X^(p)], overlapped with
    the GEMM (tp_kernels.ops.allgather_gemm, `chunks` pieces, None: the cost model picks), and the
    output is Y_r (T, ..., out_features / p).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TPGroup, gather_output: bool = False,
                 *, dtype: Optional[torch.dtype] = None, device=None, sequence_parallel: bool = False,
                 chunks: Optional[int] = None):
        super().__init__()
        self.tp = _check_tp(tp)
        self.in_features, self.out_features = in_features, out_features
        self.out_features_per_rank = divide(out_features, tp.world_size,
                                            f"out_features ({out_features}) across tp={tp.world_size} ranks")
        self.gather_output = gather_output
        self.sequence_parallel, self.chunks = sequence_parallel, chunks
        self.weight = nn.Parameter(torch.empty(self.out_features_per_rank, in_features, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(self.out_features_per_rank, dtype=dtype, device=device)) if bias else None
        _init_linear_(self.weight, self.bias, in_features)

    def _row_range(self) -> Tuple[int, int]:
        start = self.tp.rank * self.out_features_per_rank
        return start, start + self.out_features_per_rank

    def load_full(self, weight, bias=None) -> None:
        """Keep rows [r * out/p, (r+1) * out/p) of the full weight (out_features, in_features) and bias."""
        _expect_shape("weight", weight, (self.out_features, self.in_features))
        start, stop = self._row_range()
        _copy_into(self.weight, _rows(weight, start, stop), "weight")
        if (bias is None) != (self.bias is None):
            raise ValueError(f"bias given: {bias is not None}, but the layer was built with bias={self.bias is not None}")
        if bias is not None:
            _expect_shape("bias", bias, (self.out_features,))
            _copy_into(self.bias, _rows(bias, start, stop), "bias")

    @classmethod
    def from_linear(cls, linear: nn.Linear, tp: TPGroup, gather_output: bool = False, *,
                    sequence_parallel: bool = False, chunks: Optional[int] = None) -> "ColumnParallelLinear":
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, tp, gather_output,
                    dtype=linear.weight.dtype, device=linear.weight.device, sequence_parallel=sequence_parallel,
                    chunks=chunks)
        layer.load_full(linear.weight, linear.bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(type(self).__name__, x, self.in_features, self.weight)
        if self.sequence_parallel:
            if x.dim() < 2:
                raise ValueError(f"{type(self).__name__}: with sequence_parallel=True the input must be this "
                                 f"rank's token block (T / p, ..., {self.in_features}), got shape {tuple(x.shape)}")
            rows = x.reshape(-1, self.in_features)  # (T / p * ..., in_features), token-major
            y = ops.allgather_gemm(rows, self.weight, self.bias, self.tp, self.chunks)  # rank-major blocks
            y = y.reshape(x.shape[0] * self.tp.world_size, *x.shape[1:-1], self.out_features_per_rank)
        else:
            y = F.linear(x, self.weight, self.bias)  # (..., out_features_per_rank)
        if self.gather_output:
            y = ops.all_gather(y, self.tp, dim=-1)  # (..., out_features)
        return y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features} "
                f"({self.out_features_per_rank} per rank), bias={self.bias is not None}, tp={self.tp.world_size}, "
                f"gather_output={self.gather_output}, sequence_parallel={self.sequence_parallel}")


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel linears on one input, stacked into one GEMM (e.g. gate and up projections).

    With parts A^(1), ..., A^(n), rank r holds [A^(1)_r; ...; A^(n)_r]: each part is split across the
    ranks on its own, then this rank's slices are concatenated, so `split` recovers this rank's slice of
    every part.
    """

    def __init__(self, in_features: int, out_features: Sequence[int], bias: bool, tp: TPGroup,
                 *, dtype: Optional[torch.dtype] = None, device=None):
        tp = _check_tp(tp)
        self.part_out_features = [int(n) for n in out_features]
        if not self.part_out_features:
            raise ValueError("out_features must list at least one output size")
        self.part_out_features_per_rank = [
            divide(n, tp.world_size, f"out_features[{i}] ({n}) across tp={tp.world_size} ranks")
            for i, n in enumerate(self.part_out_features)]
        super().__init__(in_features, sum(self.part_out_features), bias, tp, dtype=dtype, device=device)

    def _part_slices(self, full_offsets: bool):
        """(offset of part i in the full or per-rank layout, this rank's start and stop within part i)."""
        offset = 0
        for n_full, n_per_rank in zip(self.part_out_features, self.part_out_features_per_rank):
            start = self.tp.rank * n_per_rank
            yield offset, start, start + n_per_rank
            offset += n_full if full_offsets else n_per_rank

    def load_full(self, weight, bias=None) -> None:
        """From the fused full weight (sum(out_features), in_features), parts stacked in order, or from a
        list with one full weight (out_features[i], in_features) per part (and likewise for bias)."""
        weights = weight if isinstance(weight, (list, tuple)) else None
        biases = bias if isinstance(bias, (list, tuple)) else None
        if (bias is None) != (self.bias is None):
            raise ValueError(f"bias given: {bias is not None}, but the layer was built with bias={self.bias is not None}")
        if weights is None:
            _expect_shape("weight", weight, (self.out_features, self.in_features))
        elif len(weights) != len(self.part_out_features):
            raise ValueError(f"weight: expected {len(self.part_out_features)} parts, got {len(weights)}")
        w_shards, b_shards = [], []
        for i, (offset, start, stop) in enumerate(self._part_slices(full_offsets=True)):
            if weights is not None:
                _expect_shape(f"weight[{i}]", weights[i], (self.part_out_features[i], self.in_features))
                w_shards.append(_rows(weights[i], start, stop))
            else:
                w_shards.append(_rows(weight, offset + start, offset + stop))
            if bias is not None:
                if biases is not None:
                    _expect_shape(f"bias[{i}]", biases[i], (self.part_out_features[i],))
                    b_shards.append(_rows(biases[i], start, stop))
                else:
                    b_shards.append(_rows(bias, offset + start, offset + stop))
        if bias is not None and biases is None:
            _expect_shape("bias", bias, (self.out_features,))
        _copy_into(self.weight, torch.cat(w_shards), "weight")
        if bias is not None:
            _copy_into(self.bias, torch.cat(b_shards), "bias")

    @classmethod
    def from_linears(cls, linears: Sequence[nn.Linear], tp: TPGroup) -> "MergedColumnParallelLinear":
        first = linears[0]
        if any(lin.in_features != first.in_features for lin in linears):
            raise ValueError(f"all linears must share in_features, got {[lin.in_features for lin in linears]}")
        has_bias = first.bias is not None
        if any((lin.bias is not None) != has_bias for lin in linears):
            raise ValueError("either all linears have a bias or none does")
        layer = cls(first.in_features, [lin.out_features for lin in linears], has_bias, tp,
                    dtype=first.weight.dtype, device=first.weight.device)
        layer.load_full([lin.weight for lin in linears], [lin.bias for lin in linears] if has_bias else None)
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, tp: TPGroup, out_features: Sequence[int] = ()) -> "MergedColumnParallelLinear":
        """From one fused nn.Linear whose output rows are the parts of sizes out_features, stacked."""
        if sum(out_features) != linear.out_features:
            raise ValueError(f"out_features {list(out_features)} must sum to linear.out_features ({linear.out_features})")
        layer = cls(linear.in_features, out_features, linear.bias is not None, tp,
                    dtype=linear.weight.dtype, device=linear.weight.device)
        layer.load_full(linear.weight, linear.bias)
        return layer

    def split(self, y: torch.Tensor) -> List[torch.Tensor]:
        """This rank's output (..., sum(out_features) / p) -> one tensor per part."""
        return list(y.split(self.part_out_features_per_rank, dim=-1))


# ----------------------------------------------------------------------------------------------------------
# attention projection
# ----------------------------------------------------------------------------------------------------------
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
        tp = _check_tp(tp)
        self.head_dim, self.n_heads, self.n_kv_heads = head_dim, n_heads, n_kv_heads
        self.n_heads_per_rank = divide(n_heads, tp.world_size, f"n_heads ({n_heads}) across tp={tp.world_size} ranks")
        divide(n_heads, n_kv_heads, f"n_heads ({n_heads}) into groups of n_kv_heads ({n_kv_heads})")
        if tp.world_size <= n_kv_heads:
            self.n_kv_heads_per_rank = divide(n_kv_heads, tp.world_size,
                                              f"n_kv_heads ({n_kv_heads}) across tp={tp.world_size} ranks")
            self.kv_head_start = tp.rank * self.n_kv_heads_per_rank
        else:
            ranks_per_kv_head = divide(tp.world_size, n_kv_heads,
                                       f"tp={tp.world_size} ranks sharing n_kv_heads ({n_kv_heads}) replicated heads")
            self.n_kv_heads_per_rank = 1
            self.kv_head_start = tp.rank // ranks_per_kv_head
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
        _expect_shape("weight", weight, (self.out_features, self.in_features))
        if (bias is None) != (self.bias is None):
            raise ValueError(f"bias given: {bias is not None}, but the layer was built with bias={self.bias is not None}")
        rows = self._head_rows()
        _copy_into(self.weight, torch.cat([_rows(weight, o + a, o + b) for o, a, b in rows]), "weight")
        if bias is not None:
            _expect_shape("bias", bias, (self.out_features,))
            _copy_into(self.bias, torch.cat([_rows(bias, o + a, o + b) for o, a, b in rows]), "bias")

    def load_full_qkv(self, q_weight, k_weight, v_weight, q_bias=None, k_bias=None, v_bias=None) -> None:
        """From separate full q, k, v weights (as Llama checkpoints store them) and optional biases."""
        hd = self.head_dim
        for name, t, n in (("q_weight", q_weight, self.n_heads), ("k_weight", k_weight, self.n_kv_heads),
                           ("v_weight", v_weight, self.n_kv_heads)):
            _expect_shape(name, t, (n * hd, self.in_features))
        biases = (q_bias, k_bias, v_bias)
        if any(b is None for b in biases) != all(b is None for b in biases):
            raise ValueError("give all of q_bias, k_bias, v_bias or none of them")
        if (q_bias is None) != (self.bias is None):
            raise ValueError(f"biases given: {q_bias is not None}, but the layer was built with bias={self.bias is not None}")
        rows = self._head_rows()
        shards = [_rows(t, a, b) for t, (_, a, b) in zip((q_weight, k_weight, v_weight), rows)]
        _copy_into(self.weight, torch.cat(shards), "weight")
        if q_bias is not None:
            for name, t, n in (("q_bias", q_bias, self.n_heads), ("k_bias", k_bias, self.n_kv_heads),
                               ("v_bias", v_bias, self.n_kv_heads)):
                _expect_shape(name, t, (n * hd,))
            _copy_into(self.bias, torch.cat([_rows(t, a, b) for t, (_, a, b) in zip(biases, rows)]), "bias")

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


# ----------------------------------------------------------------------------------------------------------
# row parallel
# ----------------------------------------------------------------------------------------------------------
class RowParallelLinear(nn.Module):
    """Linear layer split along its input features.

    A = [A_1, ..., A_p] by columns and X = [X_1, ..., X_p] to match: rank r holds A_r
    (out_features, in_features / p) and Y = X_1 A_1^T + ... + X_p A_p^T + b, the partial products summed
    by tp_kernels.ops.gemm_allreduce. The bias is added once, after the reduction. With
    input_is_parallel=True (the usual case, after a ColumnParallelLinear) the input is already X_r;
    otherwise the layer takes the full X and keeps its slice.

    sequence_parallel=True: the sum is scattered along the first (token) dimension instead of being
    all-reduced (tp_kernels.ops.gemm_reduce_scatter): the input is (T, ..., in), T divisible by p, and
    rank r gets rows [r T / p, (r+1) T / p) of Y, (T / p, ..., out_features).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TPGroup, input_is_parallel: bool = True,
                 *, dtype: Optional[torch.dtype] = None, device=None, chunks: Optional[int] = None,
                 sequence_parallel: bool = False):
        super().__init__()
        self.tp = _check_tp(tp)
        self.in_features, self.out_features = in_features, out_features
        self.in_features_per_rank = divide(in_features, tp.world_size,
                                           f"in_features ({in_features}) across tp={tp.world_size} ranks")
        self.input_is_parallel = input_is_parallel
        self.chunks, self.sequence_parallel = chunks, sequence_parallel
        self.weight = nn.Parameter(torch.empty(out_features, self.in_features_per_rank, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None
        _init_linear_(self.weight, self.bias, in_features)

    def _col_range(self) -> Tuple[int, int]:
        start = self.tp.rank * self.in_features_per_rank
        return start, start + self.in_features_per_rank

    def load_full(self, weight, bias=None) -> None:
        """Keep columns [r * in/p, (r+1) * in/p) of the full weight (out_features, in_features); the bias
        is kept whole (it is added once, after the reduction)."""
        _expect_shape("weight", weight, (self.out_features, self.in_features))
        _copy_into(self.weight, _cols(weight, *self._col_range()), "weight")
        if (bias is None) != (self.bias is None):
            raise ValueError(f"bias given: {bias is not None}, but the layer was built with bias={self.bias is not None}")
        if bias is not None:
            _expect_shape("bias", bias, (self.out_features,))
            _copy_into(self.bias, bias[:], "bias")

    @classmethod
    def from_linear(cls, linear: nn.Linear, tp: TPGroup, input_is_parallel: bool = True, *,
                    sequence_parallel: bool = False, chunks: Optional[int] = None) -> "RowParallelLinear":
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, tp, input_is_parallel,
                    dtype=linear.weight.dtype, device=linear.weight.device, chunks=chunks,
                    sequence_parallel=sequence_parallel)
        layer.load_full(linear.weight, linear.bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        expected_in = self.in_features_per_rank if self.input_is_parallel else self.in_features
        _check_input(type(self).__name__, x, expected_in, self.weight)
        if not self.input_is_parallel:
            x = x[..., slice(*self._col_range())]  # (..., in_features_per_rank)
        rows = x.reshape(-1, self.in_features_per_rank)  # (T * ..., in_features_per_rank), token-major
        if self.sequence_parallel:
            _check_sequence_split(type(self).__name__, x, self.tp)
            y = ops.gemm_reduce_scatter(rows, self.weight, self.bias, self.tp, self.chunks)
            return y.reshape(x.shape[0] // self.tp.world_size, *x.shape[1:-1], self.out_features)
        y = ops.gemm_allreduce(rows, self.weight, self.bias, self.tp, self.chunks)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features} ({self.in_features_per_rank} per rank), "
                f"out_features={self.out_features}, bias={self.bias is not None}, tp={self.tp.world_size}, "
                f"input_is_parallel={self.input_is_parallel}, sequence_parallel={self.sequence_parallel}")


# ----------------------------------------------------------------------------------------------------------
# vocabulary parallel
# ----------------------------------------------------------------------------------------------------------
class _VocabShard(nn.Module):
    """Rows of a (vocab_size, dim) table split across ranks; the vocabulary is padded to a multiple of p
    with zero rows so every rank holds vocab_size_per_rank rows: [r * v, (r+1) * v) of the padded table."""

    def __init__(self, vocab_size: int, dim: int, tp: TPGroup, dtype, device):
        super().__init__()
        self.tp = _check_tp(tp)
        if vocab_size < 1 or dim < 1:
            raise ValueError(f"vocab_size and dim must be >= 1, got {vocab_size}, {dim}")
        self.vocab_size, self.dim = vocab_size, dim
        self.vocab_size_per_rank = -(-vocab_size // tp.world_size)  # ceil
        self.vocab_size_padded = self.vocab_size_per_rank * tp.world_size
        self.vocab_start = tp.rank * self.vocab_size_per_rank
        self.weight = nn.Parameter(torch.empty(self.vocab_size_per_rank, dim, dtype=dtype, device=device))

    def _zero_padding_rows(self) -> None:
        n_real = max(0, min(self.vocab_size - self.vocab_start, self.vocab_size_per_rank))
        with torch.no_grad():
            self.weight[n_real:].zero_()

    def load_full(self, weight) -> None:
        """Keep this rank's rows of the full (vocab_size, dim) table; padding rows are zero."""
        _expect_shape("weight", weight, (self.vocab_size, self.dim))
        stop = min(self.vocab_start + self.vocab_size_per_rank, self.vocab_size)
        n_real = max(0, stop - self.vocab_start)
        with torch.no_grad():
            if n_real:
                shard = _rows(weight, self.vocab_start, stop)
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
        if ids.device.type == "cpu" and not torch.compiler.is_compiling() and ids.numel():
            lo, hi = int(ids.min()), int(ids.max())  # free on CPU; on GPU it would cost a sync per step
            if lo < 0 or hi >= self.vocab_size:
                raise ValueError(f"VocabParallelEmbedding: ids must be in [0, {self.vocab_size}), got [{lo}, {hi}]")
        local = ids - self.vocab_start
        in_range = (local >= 0) & (local < self.vocab_size_per_rank)
        rows = F.embedding(local.clamp(0, self.vocab_size_per_rank - 1), self.weight)  # (..., dim)
        rows = rows * in_range.unsqueeze(-1).to(rows.dtype)
        return ops.all_reduce(rows, self.tp)


class ParallelLMHead(_VocabShard):
    """Output projection split by vocabulary rows: each rank computes the logits of its vocabulary slice,
    the slices are gathered, and the padding is cut, so every rank returns (..., vocab_size) logits.
    `tied_to(embedding)` shares the embedding's shard (the padding matches by construction)."""

    def __init__(self, vocab_size: int, dim: int, tp: TPGroup, bias: bool = False, *,
                 dtype: Optional[torch.dtype] = None, device=None):
        super().__init__(vocab_size, dim, tp, dtype, device)
        self.bias = nn.Parameter(torch.zeros(self.vocab_size_per_rank, dtype=dtype, device=device)) if bias else None
        _init_linear_(self.weight, self.bias, dim)
        self._zero_padding_rows()

    def load_full(self, weight, bias=None) -> None:
        super().load_full(weight)
        if (bias is None) != (self.bias is None):
            raise ValueError(f"bias given: {bias is not None}, but the layer was built with bias={self.bias is not None}")
        if bias is not None:
            _expect_shape("bias", bias, (self.vocab_size,))
            stop = min(self.vocab_start + self.vocab_size_per_rank, self.vocab_size)
            n_real = max(0, stop - self.vocab_start)
            with torch.no_grad():
                self.bias.zero_()
                if n_real:
                    self.bias[:n_real].copy_(_rows(bias, self.vocab_start, stop).to(self.bias.dtype))

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
        _check_input(type(self).__name__, x, self.dim, self.weight)
        logits = F.linear(x, self.weight, self.bias)  # (..., vocab_size_per_rank)
        logits = ops.all_gather(logits, self.tp, dim=-1)  # (..., vocab_size_padded)
        return logits[..., :self.vocab_size]
