"""Whether gemm_allreduce, gemm_reduce_scatter and allgather_gemm run as the fused GEMM + collective kernel
(tp_kernels/kernels/gemm_collective.py) rather than the chunk pipeline, decided in one place.

The fused kernel is taken when the group has symmetric buffers on the input's device
(`SymmetricBuffer.create(tp, device=...)`), the caller left `chunks` to the cost model, the call fits the
buffer, and the cost model (`cost_model.best_form`) says the fused form is at least as fast as the best
chunk count. A group without symmetric buffers, a caller who asks for chunks, and a block of code under
`tp.use_backend(...)` (which forces who serves the group's collectives) get the pipeline with no message
(those are choices); anything else that keeps a group with buffers off the fused kernel logs a
warning once per reason, saying why. Every rank reaches the same decision: it depends on group-wide state
and on the arguments' shapes and dtype, the same on every rank when the shards are even (as the layers
make them; the chunk pipeline's plan relies on the same).

The CUDA implementations of the ops ask `fused_call`; the function itself is device-agnostic, which is how
the CPU tests check it under the interpreter.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

from tp_kernels.perf import calibration, cost_model
from tp_kernels.comm import symmetric

log = logging.getLogger(__name__)
_warned: set = set()

COLLECTIVES = ("all_reduce", "reduce_scatter", "all_gather")
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _fallback(reason: str) -> str:
    if reason not in _warned:
        _warned.add(reason)
        log.warning("fused GEMM + collective kernel not used, the chunk pipeline runs instead: %s", reason)
    return reason


def _kernels():
    """tp_kernels.kernels.gemm_collective, or None where triton is not installed."""
    try:
        from tp_kernels.kernels import gemm_collective
    except ImportError:
        return None
    return gemm_collective


def fused_reason(tp, x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor], chunks: Optional[int],
                 collective: str) -> Optional[str]:
    """Why this call does not take the fused kernel, or None when it does. Arguments already checked."""
    if collective not in COLLECTIVES:
        raise ValueError(f"collective must be one of {COLLECTIVES}, got {collective!r}")
    buf = symmetric.buffer_of(tp.name)
    if buf is None:
        return "the group has no symmetric buffers"
    if chunks is not None:
        return f"chunks={chunks} was asked for"
    if tp.forced_backend is not None:  # the chain decides who communicates: the fused kernel is not in it
        return f"use_backend({tp.forced_backend!r}) forces the group's collectives"
    if buf.device != x.device:
        return _fallback(f"the group's symmetric buffers are on {buf.device}, the input on {x.device}")
    if x.dtype not in SUPPORTED_DTYPES:
        return _fallback(f"dtype {x.dtype} (the fused kernels take float16, bfloat16, float32)")
    kernels = _kernels()
    if kernels is None:
        return _fallback("triton is not installed")
    plan = _plan(kernels, tp, x, w, bias, collective)
    reason = buf.capacity_reason(plan.data_bytes, plan.n_signals)
    if reason is not None:
        return _fallback(f"{collective} of x {tuple(x.shape)}, w {tuple(w.shape)} {reason}")
    m, n, k = _gemm_shape(tp, x, w, collective)
    algo = kernels.MODE_NAMES[plan.mode] if collective == "all_reduce" else "two_shot"  # the launcher's pick
    form = cost_model.best_form(m, n, k, tp.world_size, x.dtype, calibration.hardware_for(tp, x.device),
                                collective, algo)[0]
    if form != "fused":
        return "the cost model prefers the chunk pipeline"
    return None


def _gemm_shape(tp, x, w, collective):
    """This rank's GEMM (m, k) x (k, n) as the cost model counts it."""
    rows = x.shape[0] * (tp.world_size if collective == "all_gather" else 1)
    return rows, w.shape[0], x.shape[1]


def _plan(kernels, tp, x, w, bias, collective):
    if collective == "all_gather":
        return kernels.plan_allgather_gemm(x.shape[0], w.shape[0], x.shape[1], tp.world_size, x.dtype, x.device)
    return kernels.plan_gemm_reduce(collective, x.shape[0], w.shape[0], tp.world_size, x.dtype, x.device,
                                    bias is not None)


def fused_call(tp, x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor], chunks: Optional[int],
               collective: str) -> Optional[torch.Tensor]:
    """The op's result through the fused kernel, or None when fused_reason says no (run the pipeline)."""
    if fused_reason(tp, x, w, bias, chunks, collective) is not None:
        return None
    kernels = _kernels()
    buf = symmetric.buffer_of(tp.name)
    if collective == "all_reduce":
        return kernels.gemm_all_reduce(x, w, bias, buf)
    if collective == "reduce_scatter":
        return kernels.gemm_reduce_scatter(x, w, bias, buf)
    return kernels.allgather_gemm(x, w, bias, buf)
