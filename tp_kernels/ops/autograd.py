"""The backward formulas of the differentiable ops, called by their autograd node (csrc/autograd.cpp).

Convention (torch.distributed.nn's): every rank's output is a function of every rank's inputs, and the
gradient a rank receives is that of the sum of all ranks' losses. So the gradient of an input collects
what each rank's output did with it:

    all_reduce           y_r = sum_q x_q            dx_r = sum_s dy_s            = all_reduce(dy)
    all_gather           y_r = cat_q x_q            dx_r = sum_s dy_s[block r]   = all_reduce(dy)[block r]
    gemm_allreduce       y_r = sum_q x_q w_q^T + b_r       g = all_reduce(dy): dx = g w, dw = g^T x, db = sum dy
    gemm_reduce_scatter  y_r = rows r of sum_q x_q w_q^T + b_r  g = all_gather(dy): dx = g w, dw = g^T x
    allgather_gemm       y_r = cat_q x_q w_r^T + b_r    dx_r = all_reduce(dy w)[block r], dw = dy^T cat_q x_q

With the same loss computed on every rank (the usual case for replicated activations), these are the
gradients of world_size times that loss. The other ops are inference ops: their backward raises, naming
the op (csrc/autograd.cpp).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch

from tp_kernels._extension import _C
from tp_kernels.distributed import resolve

Grad = Optional[torch.Tensor]


def _all_reduce(dy: torch.Tensor, x, group: str, backend: str) -> List[Grad]:
    return [torch.ops.tp_kernels.all_reduce(dy.contiguous(), group, backend)]


def _all_gather(dy: torch.Tensor, x: torch.Tensor, group: str, dim: int) -> List[Grad]:
    dim = dim % max(x.dim(), 1)
    size = x.shape[dim]
    summed = torch.ops.tp_kernels.all_reduce(dy.contiguous(), group, "auto")
    return [summed.narrow(dim, resolve(group).rank * size, size)]


def _bias_grad(dy: torch.Tensor, bias) -> Grad:
    return dy.sum(0) if bias is not None else None


def _gemm_allreduce(dy, x, w, bias, group, chunks) -> List[Grad]:
    g = torch.ops.tp_kernels.all_reduce(dy.contiguous(), group, "auto")  # (M, N): every rank's partial fed every y
    return [g @ w, g.T @ x, _bias_grad(dy, bias)]


def _gemm_reduce_scatter(dy, x, w, bias, group, chunks) -> List[Grad]:
    g = torch.ops.tp_kernels.all_gather(dy.contiguous(), group, 0)  # (M, N): rank r's rows came from every partial
    return [g @ w, g.T @ x, _bias_grad(dy, bias)]


def _allgather_gemm(dy, x, w, bias, group, chunks) -> List[Grad]:
    rank, rows = resolve(group).rank, x.shape[0]
    full = torch.ops.tp_kernels.all_gather(x.contiguous(), group, 0)  # (M, K): gathered again, not kept from forward
    dfull = torch.ops.tp_kernels.all_reduce((dy @ w).contiguous(), group, "auto")  # (M, K)
    return [dfull[rank * rows:(rank + 1) * rows], dy.T @ full, _bias_grad(dy, bias)]


# op -> (formula, number of its tensor arguments)
FORMULAS: Dict[str, Tuple[Callable[..., List[Grad]], int]] = {
    "tp_kernels::all_reduce": (_all_reduce, 1),
    "tp_kernels::all_gather": (_all_gather, 1),
    "tp_kernels::gemm_allreduce": (_gemm_allreduce, 3),
    "tp_kernels::gemm_reduce_scatter": (_gemm_reduce_scatter, 3),
    "tp_kernels::allgather_gemm": (_allgather_gemm, 3),
}


def backward(op: str, grads: List[Grad], args: list) -> List[Grad]:
    """The gradients of op's tensor arguments (schema order; None where there is none) given the gradients
    of its outputs (None for an output that did not reach the loss) and its arguments as called."""
    formula, n_tensor_args = FORMULAS[op]
    if grads[0] is None:  # the output took no part in the loss
        return [None] * n_tensor_args
    return formula(grads[0], *args)


if _C is not None:
    _C.set_autograd_backward(backward)
