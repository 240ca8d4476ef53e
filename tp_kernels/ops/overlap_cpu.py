"""The CPU pipelines of the overlapped ops (tp_kernels.ops.overlap_plan explains the design): chunk GEMMs on
the calling thread, their collectives on the group's communication thread (tp_kernels.comm.thread), both
through the group's one collective entry point (tp.all_reduce, tp.all_gather).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from tp_kernels.comm import thread as comm_thread
from tp_kernels.ops.overlap_plan import (add_bias_, block_gemm, chunk_bounds, chunk_gemm, gather_rows,
                                         plan_allgather_gemm, plan_gemm_allreduce, plan_gemm_reduce_scatter,
                                         reduce_rows_of_rank)

if TYPE_CHECKING:
    from tp_kernels.distributed import TPGroup

def _pipeline_cpu(tp: "TPGroup", jobs, collective, after) -> list:
    """Run the chunks' GEMMs on this thread and their collectives on the group's communication thread.
    jobs is a list of zero-argument GEMMs (reductions: GEMM first, then the collective of its output) or
    of collective arguments (gathers: collective first, then `after` computes on its result)."""
    futures = []
    try:
        if after is None:  # GEMM -> collective: chunk i's collective runs while chunk i+1's GEMM does
            for gemm in jobs:
                futures.append(comm_thread.submit(tp, collective, tp, gemm()))
            return comm_thread.wait_all(futures)
        # collective -> GEMM: every gather is queued at once; chunk i's GEMM runs while chunk i+1 gathers
        for arg in jobs:
            futures.append(comm_thread.submit(tp, collective, tp, arg))
        results = []
        for i, future in enumerate(futures):
            results.append(after(i, future.result()))
        return results
    except BaseException:
        comm_thread.drain(futures)  # keep the invariant: nothing of ours runs on when we return
        raise


def _gemm_allreduce_cpu(x, w, bias, group, chunks=None):
    tp, n_chunks = plan_gemm_allreduce(x, w, bias, group, chunks)
    m = x.shape[0]
    if n_chunks == 1:
        partial = chunk_gemm(x, w)  # (M, N), dead once reduced: reduced in place
        return add_bias_(tp.all_reduce(partial, out=partial), bias)
    jobs = [lambda s=start, e=stop: chunk_gemm(x[s:e], w) for start, stop in chunk_bounds(m, n_chunks)]
    reduced = _pipeline_cpu(tp, jobs, lambda tp_, t: tp_.all_reduce(t, out=t), None)
    return add_bias_(torch.cat(reduced), bias)  # (M, N)


def _gemm_reduce_scatter_cpu(x, w, bias, group, chunks=None):
    tp, x_blocks, n_chunks = plan_gemm_reduce_scatter(x, w, bias, group, chunks)
    rows_per_rank = x_blocks.shape[1]
    if n_chunks == 1:
        rows = reduce_rows_of_rank(tp, block_gemm(x_blocks, w, 0, rows_per_rank))  # a view into all p blocks
        return rows + bias if bias is not None else rows.clone()  # own storage, as the fake impl promises
    jobs = [lambda s=start, e=stop: block_gemm(x_blocks, w, s, e)
            for start, stop in chunk_bounds(rows_per_rank, n_chunks)]
    reduced = _pipeline_cpu(tp, jobs, reduce_rows_of_rank, None)
    return add_bias_(torch.cat(reduced), bias)  # (M / p, N)


def _allgather_gemm_cpu(x, w, bias, group, chunks=None):
    tp, n_chunks = plan_allgather_gemm(x, w, bias, group, chunks)
    rows_per_rank, n, p = x.shape[0], w.shape[0], tp.world_size
    if n_chunks == 1:
        return chunk_gemm(gather_rows(tp, x), w, bias)
    out = x.new_empty((p, rows_per_rank, n))  # (p, M / p, N): block r <- rank r's input rows
    bounds = chunk_bounds(rows_per_rank, n_chunks)

    def compute(i, gathered):  # gathered (p * rows, K)
        start, stop = bounds[i]
        out[:, start:stop] = chunk_gemm(gathered, w, bias).view(p, stop - start, n)

    _pipeline_cpu(tp, [x[start:stop] for start, stop in bounds], gather_rows, compute)
    return out.view(p * rows_per_rank, n)


# register_kernel used as a decorator returns None, so register after definition
for _op, _kernel in (("gemm_allreduce", _gemm_allreduce_cpu), ("gemm_reduce_scatter", _gemm_reduce_scatter_cpu),
                     ("allgather_gemm", _allgather_gemm_cpu)):
    torch.library.register_kernel(f"tp_kernels::{_op}", "cpu", _kernel)
