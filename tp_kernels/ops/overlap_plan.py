"""GEMMs overlapped with their collectives (gemm_allreduce, gemm_reduce_scatter, allgather_gemm): what the CPU
pipeline (tp_kernels.ops.overlap_cpu) and the CUDA pipeline (tp_kernels.ops.overlap_cuda) share, the argument
checks, the chunk plan and the per-chunk steps; each pipeline imports this module and nothing of the other.

Each op splits the token dimension M into chunks and pipelines them, so the collective of one chunk runs
while the GEMM of another is computed. The result equals the unchunked op up to the order of
floating-point sums; the bias is added once, after the reduction.

CPU: the calling thread computes the GEMMs; the group's persistent communication thread
(tp_kernels.comm.thread, whose docstring states the invariant that keeps its collectives and the
calling thread's apart) runs the collectives through the group's chain (tp.all_reduce, tp.all_gather).
CUDA: the GEMMs run on the current (compute) stream, the collectives on a per-device communication
stream that waits for an event after each chunk's GEMM; the compute stream waits for the communication
stream before the bias. Only stream waits, no host syncs: capturable in a CUDA graph.

Why the CUDA orchestration is Python and not C++: a chunk costs four host calls (GEMM, event record,
stream wait, collective), ~10 us each from Python against ~3 us from C++ (estimates, not measured
here), so for the 8 chunks at most that the cost model picks, ~80 us of host time in eager mode,
hidden behind GEMMs that last >= 100 us whenever the model picks more than one chunk on an H100
(M >= 1024 at hidden 8192, bench/gemm_overlap_model.py), and zero under CUDA graphs, where serving
runs these ops. C++ would save microseconds at the price of a second implementation of the chain.

M not divisible by the world size (gemm_reduce_scatter): raises. Sequence parallelism gives each rank
M / p rows; padding would make the output's row count differ from what the caller's next layer expects
and hide a mismatched batch, so the caller pads (as it already does for CUDA-graph batch sizes).
gemm_reduce_scatter reduces each chunk with the chain's all-reduce and keeps this rank's rows: the
chain has no reduce-scatter, so it moves the bytes of an all-reduce (2 (p-1)/p of the output, twice a
reduce-scatter's), and the cost model plans it as one.
"""
from __future__ import annotations

import logging
from typing import List, Tuple

import torch
import torch.nn.functional as F

from tp_kernels.distributed import TPGroup, resolve
from tp_kernels.ops import checks
from tp_kernels.perf import calibration, cost_model

log = logging.getLogger(__name__)

def _triton_matmul():
    """tp_kernels.kernels.matmul.matmul, or None where triton is not installed (the CPU-only torch)."""
    try:
        from tp_kernels.kernels.matmul import matmul
    except ImportError:
        return None
    return matmul


_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def chunk_gemm(x: torch.Tensor, w: torch.Tensor, bias=None) -> torch.Tensor:
    """One chunk's GEMM: x (rows, K) @ w (N, K).T + bias -> (rows, N). On CUDA the Triton GEMM (its
    decode-sized tiles do not waste a 128-row tile on a small chunk); on CPU, and for float64, torch's."""
    if x.is_cuda and x.dtype in _TRITON_DTYPES:
        matmul = _triton_matmul()
        if matmul is not None:
            return matmul(x, w, bias)
    return F.linear(x, w, bias)


def block_gemm(x_blocks: torch.Tensor, w: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of every rank's block: x_blocks (p, M / p, K) -> (p, stop - start, N)."""
    p, _, k = x_blocks.shape
    rows = x_blocks[:, start:stop].reshape(p * (stop - start), k)  # (p * rows, K), a copy unless one block
    return chunk_gemm(rows, w).view(p, stop - start, w.shape[0])


# ----------------------------------------------------------------------------------------------------------
# planning
# ----------------------------------------------------------------------------------------------------------
def chunk_bounds(n_rows: int, n_chunks: int) -> List[Tuple[int, int]]:
    """[start, stop) of n_chunks near-equal row ranges covering n_rows (sizes differ by at most one)."""
    edges = [i * n_rows // n_chunks for i in range(n_chunks + 1)]
    return list(zip(edges[:-1], edges[1:]))


_LOGGED_PLANS: set = set()


def plan_chunks(chunks, tp: TPGroup, x: torch.Tensor, m: int, n: int, k: int, n_rows: int, collective: str) -> int:
    """The chunk count: the caller's, else the cost model's for this rank's GEMM (m, k) x (k, n) with the
    constants of tp_kernels.perf.calibration.hardware_for (1 where there are none: a CPU group never
    calibrated); clamped to the n_rows that are split so that no chunk is empty. What chunks=None plans
    with is logged once per group and device type."""
    if chunks is None:
        if tp.world_size == 1 or n_rows <= 1:
            return 1  # no collective to hide / nothing to split
        hw = calibration.hardware_for(tp, x.device)
        _log_plan_once(tp, x.device, hw)
        if hw is None:
            return 1
        chunks = cost_model.best_chunks(m, n, k, tp.world_size, x.dtype, hw, collective)
    return max(1, min(chunks, n_rows))


def _log_plan_once(tp: TPGroup, device: torch.device, hw) -> None:
    key = (tp.name, device.type)
    if key in _LOGGED_PLANS:
        return
    _LOGGED_PLANS.add(key)
    if hw is None:
        log.info("group %r: chunks=None runs the overlapped ops on %s as one chunk (no calibration; "
                 "tp_kernels.calibrate(tp) measures this host and lets the cost model choose)", tp.name, device.type)
    else:
        log.info("group %r: chunks=None plans the overlapped ops on %s with %s (%s)", tp.name, device.type, hw.name,
                 hw.source)


def reduce_rows_of_rank(tp: TPGroup, partial: torch.Tensor) -> torch.Tensor:
    """partial (p, rows, N) -> the sum over the group of block tp.rank: (rows, N), a view into partial,
    which is reduced in place (the caller's partial products are dead once reduced)."""
    return tp.all_reduce(partial, out=partial)[tp.rank]


def gather_rows(tp: TPGroup, x_chunk: torch.Tensor) -> torch.Tensor:
    return tp.all_gather(x_chunk.contiguous(), 0)  # (p * rows, K), rank 0's rows first


def add_bias_(out: torch.Tensor, bias) -> torch.Tensor:
    if bias is not None:
        out += bias  # once, after the reduction: every rank holds the full bias
    return out


# ----------------------------------------------------------------------------------------------------------
# checks and chunk plan of each op
# ----------------------------------------------------------------------------------------------------------
def plan_gemm_allreduce(x, w, bias, group, chunks):
    """Check the arguments; (tp, number of chunks)."""
    checks.check_gemm(x, w, bias, chunks)
    tp = resolve(group)
    m, k = x.shape
    return tp, plan_chunks(chunks, tp, x, m, w.shape[0], k, m, "all_reduce")


def plan_gemm_reduce_scatter(x, w, bias, group, chunks):
    """Check the arguments; (tp, x as (p, M / p, K) blocks where block r holds rank r's output rows,
    number of chunks)."""
    tp = resolve(group)
    checks.check_gemm_reduce_scatter(x, w, bias, chunks, tp.world_size)
    m, k = x.shape
    rows_per_rank = m // tp.world_size
    x_blocks = x.reshape(tp.world_size, rows_per_rank, k)  # (p, M / p, K)
    return tp, x_blocks, plan_chunks(chunks, tp, x, m, w.shape[0], k, rows_per_rank, "all_reduce")


def plan_allgather_gemm(x, w, bias, group, chunks):
    """Check the arguments; (tp, number of chunks)."""
    checks.check_gemm(x, w, bias, chunks)
    tp = resolve(group)
    rows_per_rank, k = x.shape
    return tp, plan_chunks(chunks, tp, x, tp.world_size * rows_per_rank, w.shape[0], k, rows_per_rank, "all_gather")
