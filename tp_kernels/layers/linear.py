"""Linear layers split along their output features (column parallel) or their input features (row parallel).

Notation: a linear layer computes Y = X A^T with A (out_features, in_features); p = tp.world_size and r
is this rank.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from tp_kernels import ops
from tp_kernels.comm import symmetric
from tp_kernels.distributed import TPGroup
from tp_kernels.layers.sharding import (check_bias_given, check_input, check_sequence_split, check_size, check_tp,
                                        cols_of, copy_into, divide, expect_shape, init_linear_, rows_of)


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
        self.tp = check_tp(tp)
        self.in_features = check_size("in_features", in_features)
        self.out_features = check_size("out_features", out_features)
        self.out_features_per_rank = divide(out_features, tp.world_size,
                                            f"out_features ({out_features}) across tp={tp.world_size} ranks")
        self.gather_output = gather_output
        self.sequence_parallel, self.chunks = sequence_parallel, chunks
        self.weight = nn.Parameter(torch.empty(self.out_features_per_rank, in_features, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(self.out_features_per_rank, dtype=dtype, device=device)) if bias else None
        init_linear_(self.weight, self.bias, in_features)

    def _row_range(self) -> Tuple[int, int]:
        start = self.tp.rank * self.out_features_per_rank
        return start, start + self.out_features_per_rank

    def load_full(self, weight, bias=None) -> None:
        """Keep rows [r * out/p, (r+1) * out/p) of the full weight (out_features, in_features) and bias."""
        expect_shape("weight", weight, (self.out_features, self.in_features))
        start, stop = self._row_range()
        copy_into(self.weight, rows_of(weight, start, stop), "weight")
        check_bias_given(bias, self.bias)
        if bias is not None:
            expect_shape("bias", bias, (self.out_features,))
            copy_into(self.bias, rows_of(bias, start, stop), "bias")

    @classmethod
    def from_linear(cls, linear: nn.Linear, tp: TPGroup, gather_output: bool = False, *,
                    sequence_parallel: bool = False, chunks: Optional[int] = None) -> "ColumnParallelLinear":
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, tp, gather_output,
                    dtype=linear.weight.dtype, device=linear.weight.device, sequence_parallel=sequence_parallel,
                    chunks=chunks)
        layer.load_full(linear.weight, linear.bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(type(self).__name__, x, self.in_features, self.weight)
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
        tp = check_tp(tp)
        if isinstance(out_features, (int, str)) or not len(out_features):
            raise ValueError(f"out_features must list at least one output size, got {out_features!r}")
        self.part_out_features = [check_size(f"out_features[{i}]", n) for i, n in enumerate(out_features)]
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
        check_bias_given(bias, self.bias)
        if weights is None:
            expect_shape("weight", weight, (self.out_features, self.in_features))
        elif len(weights) != len(self.part_out_features):
            raise ValueError(f"weight: expected {len(self.part_out_features)} parts, got {len(weights)}")
        w_shards, b_shards = [], []
        for i, (offset, start, stop) in enumerate(self._part_slices(full_offsets=True)):
            if weights is not None:
                expect_shape(f"weight[{i}]", weights[i], (self.part_out_features[i], self.in_features))
                w_shards.append(rows_of(weights[i], start, stop))
            else:
                w_shards.append(rows_of(weight, offset + start, offset + stop))
            if bias is not None:
                if biases is not None:
                    expect_shape(f"bias[{i}]", biases[i], (self.part_out_features[i],))
                    b_shards.append(rows_of(biases[i], start, stop))
                else:
                    b_shards.append(rows_of(bias, offset + start, offset + stop))
        if bias is not None and biases is None:
            expect_shape("bias", bias, (self.out_features,))
        copy_into(self.weight, torch.cat(w_shards), "weight")
        if bias is not None:
            copy_into(self.bias, torch.cat(b_shards), "bias")

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
        self.tp = check_tp(tp)
        self.in_features = check_size("in_features", in_features)
        self.out_features = check_size("out_features", out_features)
        self.in_features_per_rank = divide(in_features, tp.world_size,
                                           f"in_features ({in_features}) across tp={tp.world_size} ranks")
        self.input_is_parallel = input_is_parallel
        self.chunks, self.sequence_parallel = chunks, sequence_parallel
        self.weight = nn.Parameter(torch.empty(out_features, self.in_features_per_rank, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None
        init_linear_(self.weight, self.bias, in_features)

    def _col_range(self) -> Tuple[int, int]:
        start = self.tp.rank * self.in_features_per_rank
        return start, start + self.in_features_per_rank

    def load_full(self, weight, bias=None) -> None:
        """Keep columns [r * in/p, (r+1) * in/p) of the full weight (out_features, in_features); the bias
        is kept whole (it is added once, after the reduction)."""
        expect_shape("weight", weight, (self.out_features, self.in_features))
        copy_into(self.weight, cols_of(weight, *self._col_range()), "weight")
        check_bias_given(bias, self.bias)
        if bias is not None:
            expect_shape("bias", bias, (self.out_features,))
            copy_into(self.bias, bias[:], "bias")

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
        check_input(type(self).__name__, x, expected_in, self.weight)
        if not self.input_is_parallel:
            x = x[..., slice(*self._col_range())]  # (..., in_features_per_rank)
        rows = x.reshape(-1, self.in_features_per_rank)  # (T * ..., in_features_per_rank), token-major
        if self.sequence_parallel:
            check_sequence_split(type(self).__name__, x, self.tp)
            y = ops.gemm_reduce_scatter(rows, self.weight, self.bias, self.tp, self.chunks)
            return y.reshape(x.shape[0] // self.tp.world_size, *x.shape[1:-1], self.out_features)
        if self._reduces_in_place(rows):
            y = F.linear(rows, self.weight)  # (1, out_features): this rank's partial sum, dead once reduced
            ops.all_reduce_(y, self.tp)
            if self.bias is not None:
                y += self.bias  # once, after the reduction
        else:
            y = ops.gemm_allreduce(rows, self.weight, self.bias, self.tp, self.chunks)
        return y.reshape(*x.shape[:-1], self.out_features)

    def _reduces_in_place(self, rows: torch.Tensor) -> bool:
        """Whether this call is a decode step that gemm_allreduce would run as one GEMM and one all-reduce of
        its output: one row (nothing to pipeline, whatever `chunks` says), no symmetric buffers (so no fused
        GEMM + all-reduce kernel on any device), and no autograd graph to record (all_reduce_ writes in place).
        Then the layer makes those two calls itself: all_reduce_'s C++ path serves a shared-memory group
        without the Python kernel of gemm_allreduce (~35 us less per call at TP=2, see the branch's report)."""
        if rows.shape[0] != 1 or self.tp.world_size == 1 or symmetric.buffer_of(self.tp.name) is not None:
            return False
        return not (torch.is_grad_enabled() and (rows.requires_grad or self.weight.requires_grad))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features} ({self.in_features_per_rank} per rank), "
                f"out_features={self.out_features}, bias={self.bias is not None}, tp={self.tp.world_size}, "
                f"input_is_parallel={self.input_is_parallel}, sequence_parallel={self.sequence_parallel}")
