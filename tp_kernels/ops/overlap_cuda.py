"""The CUDA pipelines of the overlapped ops (tp_kernels.ops.overlap_plan explains the design and why it is
orchestrated from Python): chunk GEMMs on the current stream, collectives on a communication stream that
waits for an event after each GEMM, the current stream waiting for the communication stream at the end.
Stream waits and events only, no host synchronization, so every op here is capturable in a CUDA graph.
Each op first asks tp_kernels.ops.gemm_collective_path whether the fused one-kernel form applies (the
group has symmetric buffers and the cost model prefers it) and runs that instead.
"""
from __future__ import annotations

from typing import Dict

import torch

from tp_kernels.ops.gemm_collective_path import fused_call
from tp_kernels.ops.overlap_plan import (add_bias_, block_gemm, chunk_bounds, chunk_gemm, gather_rows,
                                         plan_allgather_gemm, plan_gemm_allreduce, plan_gemm_reduce_scatter,
                                         reduce_rows_of_rank)

_COMM_STREAMS: Dict[int, torch.cuda.Stream] = {}


def comm_stream(device: torch.device) -> torch.cuda.Stream:
    """The communication stream of a device, made once and reused (so a captured graph and eager calls
    use the same one)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = _COMM_STREAMS.get(index)
    if stream is None:
        stream = _COMM_STREAMS[index] = torch.cuda.Stream(device=index)
    return stream


def _reduce_pipeline(tp, out_chunks, gemms, reduce):
    """For each chunk: its GEMM on the compute stream, then its reduction on the communication stream
    (after an event recorded behind the GEMM), written into out_chunks[i]."""
    device = out_chunks[0].device
    compute = torch.cuda.current_stream(device)
    comm = comm_stream(device)
    for out_chunk, gemm in zip(out_chunks, gemms):
        partial = gemm()
        comm.wait_stream(compute)  # matches the GEMM just queued: records an event, comm waits on it
        with torch.cuda.stream(comm):
            out_chunk.copy_(reduce(tp, partial))
        partial.record_stream(comm)  # the allocator may not hand partial's memory to the compute stream
        # before the communication stream has read it
    compute.wait_stream(comm)  # matches the last reduction: the bias and the caller see finished rows


def _gemm_allreduce_cuda(x, w, bias, group, chunks=None):
    tp, n_chunks = plan_gemm_allreduce(x, w, bias, group, chunks)
    fused = fused_call(tp, x, w, bias, chunks, "all_reduce")  # one kernel, where gemm_collective_path says so
    if fused is not None:
        return fused
    m, n = x.shape[0], w.shape[0]
    out = x.new_empty((m, n))
    bounds = chunk_bounds(m, n_chunks)
    _reduce_pipeline(tp, [out[s:e] for s, e in bounds],
                     [lambda s=s, e=e: chunk_gemm(x[s:e], w) for s, e in bounds],
                     lambda tp_, t: tp_.all_reduce(t))
    return add_bias_(out, bias)


def _gemm_reduce_scatter_cuda(x, w, bias, group, chunks=None):
    tp, x_blocks, n_chunks = plan_gemm_reduce_scatter(x, w, bias, group, chunks)
    fused = fused_call(tp, x, w, bias, chunks, "reduce_scatter")
    if fused is not None:
        return fused
    rows_per_rank, n = x_blocks.shape[1], w.shape[0]
    out = x.new_empty((rows_per_rank, n))
    bounds = chunk_bounds(rows_per_rank, n_chunks)
    _reduce_pipeline(tp, [out[s:e] for s, e in bounds],
                     [lambda s=s, e=e: block_gemm(x_blocks, w, s, e) for s, e in bounds],
                     reduce_rows_of_rank)
    return add_bias_(out, bias)


def _allgather_gemm_cuda(x, w, bias, group, chunks=None):
    tp, n_chunks = plan_allgather_gemm(x, w, bias, group, chunks)
    fused = fused_call(tp, x, w, bias, chunks, "all_gather")
    if fused is not None:
        return fused
    rows_per_rank, n, p = x.shape[0], w.shape[0], tp.world_size
    out = x.new_empty((p, rows_per_rank, n))  # (p, M / p, N): block r <- rank r's input rows
    bounds = chunk_bounds(rows_per_rank, n_chunks)
    compute = torch.cuda.current_stream(x.device)
    comm = comm_stream(x.device)
    comm.wait_stream(compute)  # x is written by work queued on the compute stream
    gathered = []
    with torch.cuda.stream(comm):  # every gather queued at once: chunk i+1 gathers while chunk i multiplies
        for start, stop in bounds:
            chunk = gather_rows(tp, x[start:stop])  # (p * rows, K)
            done = torch.cuda.Event()
            done.record(comm)
            gathered.append((chunk, done))
    x.record_stream(comm)
    for (start, stop), (chunk, done) in zip(bounds, gathered):
        compute.wait_event(done)  # matches done.record above
        chunk.record_stream(compute)
        out[:, start:stop] = chunk_gemm(chunk, w, bias).view(p, stop - start, n)
    return out.view(p * rows_per_rank, n)


# register_kernel used as a decorator returns None, so register after definition
for _op, _kernel in (("gemm_allreduce", _gemm_allreduce_cuda), ("gemm_reduce_scatter", _gemm_reduce_scatter_cuda),
                     ("allgather_gemm", _allgather_gemm_cuda)):
    torch.library.register_kernel(f"tp_kernels::{_op}", "cuda", _kernel)
