# Tutorial 3: hiding the all-reduce behind the GEMM with a chunked pipeline.
#
#     python python/tutorials/03_overlap_pipeline.py
#
# A row-parallel layer computes Y = all_reduce(X W_r^T): first the whole GEMM (time G), then the whole
# all-reduce (time R), one after the other, G + R. But row i of Y depends only on row i of X. Cut X into c
# chunks of rows: chunk i's all-reduce needs only chunk i's GEMM, so it can travel while chunk i+1 is being
# multiplied. The GEMM keeps the compute units busy, the reduction the link; each waits only for its own
# chunk:
#
#     serial       [ GEMM 0 | GEMM 1 | GEMM 2 | GEMM 3 ][ AR 0 | AR 1 | AR 2 | AR 3 ]
#     pipelined    [ GEMM 0 | GEMM 1 | GEMM 2 | GEMM 3 ]
#                           [ AR 0 ]  [ AR 1 ] [ AR 2 ] [ AR 3 ]
#
# With g = G / c and r = R / c per chunk, the pipeline takes g + (c - 1) * max(g, r) + r instead of G + R:
# at best (g = r) it hides all but 1/c of the shorter of the two. Chunks are not free -- each is a smaller,
# less efficient GEMM and one more collective call with its latency -- so c stays small (2 to 8), and at
# decode, with one row per sequence, there is nothing to cut: chunks=1. That is why
# tp_kernels.ops.gemm_allreduce takes `chunks` (None lets the implementation choose).
#
# Below: the same pipeline written with torch.distributed's asynchronous all-reduce on 2 CPU ranks, timed
# against the serial version, next to what the formula predicts from the measured G and R; then a check that
# tp_kernels.ops.gemm_allreduce gives the same result for every chunk count.
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import tp_kernels
from tp_kernels import ops

WORLD_SIZE = 2
ROWS, K_PER_RANK, N = 256, 256, 1024  # X_r (256, 256), W_r (1024, 256): G and R of the same order on CPU


def serial(x, w, chunks):
    """Every chunk's GEMM, then every chunk's all-reduce, waiting for each."""
    outs = [x_i @ w.T for x_i in x.chunk(chunks)]
    for y_i in outs:
        dist.all_reduce(y_i)
    return torch.cat(outs)


def pipelined(x, w, chunks):
    """Chunk i's all-reduce is issued asynchronously and runs while chunk i+1's GEMM computes."""
    outs, pending = [], []
    for x_i in x.chunk(chunks):
        y_i = x_i @ w.T
        pending.append(dist.all_reduce(y_i, async_op=True))  # gloo reduces on its own thread
        outs.append(y_i)
    for work in pending:
        work.wait()
    return torch.cat(outs)


def median_time_s(fn, repeats=15):
    fn()
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_rank(rank, init_file):
    torch.set_num_threads(1)
    tp = tp_kernels.TPGroup.init(rank=rank, world_size=WORLD_SIZE, backend="gloo", init_method=f"file://{init_file}")
    torch.manual_seed(rank)
    x, w = torch.randn(ROWS, K_PER_RANK), torch.randn(N, K_PER_RANK)

    gemm_s = median_time_s(lambda: x @ w.T)
    partial = x @ w.T
    allreduce_s = median_time_s(lambda: dist.all_reduce(partial.clone()))
    reference = serial(x, w, 1)
    lines = []
    for chunks in (1, 2, 4, 8):
        serial_s = median_time_s(lambda: serial(x, w, chunks))
        pipelined_s = median_time_s(lambda: pipelined(x, w, chunks))
        g, r = gemm_s / chunks, allreduce_s / chunks
        predicted_s = g + (chunks - 1) * max(g, r) + r
        lines.append(f"  {chunks:>6}  {serial_s * 1e3:>7.1f} ms  {pipelined_s * 1e3:>9.1f} ms  "
                     f"{predicted_s * 1e3:>9.1f} ms")
        if not torch.allclose(pipelined(x, w, chunks), reference, rtol=1e-5, atol=1e-3):
            raise SystemExit(f"rank {rank}: the pipelined result with {chunks} chunks differs from the serial one")
    # the library op: same result for every chunk count (sums in the same order per row)
    for chunks in (1, 2, 4, 8):
        y = ops.gemm_allreduce(x, w, None, tp, chunks=chunks)
        if not torch.allclose(y, reference, rtol=1e-5, atol=1e-3):
            raise SystemExit(f"rank {rank}: ops.gemm_allreduce(chunks={chunks}) differs from the serial reference")
    if rank == 0:
        print(f"Measured on {WORLD_SIZE} CPU ranks (gloo, one compute thread each), X_r {ROWS}x{K_PER_RANK}, "
              f"W_r {N}x{K_PER_RANK}, fp32: whole GEMM G = {gemm_s * 1e3:.1f} ms, whole all-reduce "
              f"R = {allreduce_s * 1e3:.1f} ms (medians). The machine is shared with other work, so the\n"
              "gain depends on a free core for gloo's thread; on a GPU the GEMM and the transfer use separate units.")
        print(f"  {'chunks':>6}  {'serial':>10}  {'pipelined':>12}  {'formula':>12}")
        print("\n".join(lines))
        print("ops.gemm_allreduce(x, w, None, tp, chunks=c) equals the unchunked result for c = 1, 2, 4, 8.")
    dist.destroy_process_group()


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(run_rank, args=(os.path.join(tmp, "rendezvous"),), nprocs=WORLD_SIZE)
