# Tutorial 2: why the all-reduce dominates decode.
#
#     python python/tutorials/02_allreduce_in_decode.py
#
# A row-parallel layer (tutorial 1) ends with an all-reduce of its (tokens, d_model) output. Two costs
# compete on every rank:
#   * the GEMM of its weight shard, W_r of shape (d_model, d_ff / p). At decode, one new token per sequence,
#     the GEMM is a matrix-vector product: its time is the time to stream W_r from memory, d_model * d_ff / p
#     elements, whatever the batch; it shrinks as 1/p.
#   * the all-reduce of tokens * d_model values. At decode that is a few kilobytes, so its time is latency:
#     a fixed cost per call (synchronizing the ranks, a round over the link) that does not shrink with p.
# So the more ranks and the fewer tokens, the larger the all-reduce's share. During prefill (hundreds of
# tokens) the GEMM does tokens times more work and the all-reduce is small beside it.
#
# Part 1 measures both on 2 CPU ranks (gloo, or the shared-memory communicator where it is built). Part 2 puts
# numbers on a GPU with the analytic model in tp_kernels.perf.cost_model: those are MODELED, not measured.
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import tp_kernels
from tp_kernels import ops
from tp_kernels.perf.cost_model import HARDWARE

WORLD_SIZE = 2
D_MODEL, D_FF = 1024, 4096  # the down projection of a small model: W_r is (1024, 2048) fp32, 8 MB per rank
TOKEN_COUNTS = (1, 256)  # decode step, prefill chunk


def median_time_s(fn, tp, repeats=25):
    """Median wall time of fn() over repeats, each start aligned across ranks by a barrier."""
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_on_rank(rank, init_file):
    torch.set_num_threads(1)  # one core per rank
    tp = tp_kernels.TPGroup.init(rank=rank, world_size=WORLD_SIZE, backend="gloo", init_method=f"file://{init_file}")
    w_shard = torch.randn(D_MODEL, D_FF // WORLD_SIZE)  # this rank's columns of W: (d_model, d_ff / p)
    rows = []
    for tokens in TOKEN_COUNTS:
        h_shard = torch.randn(tokens, D_FF // WORLD_SIZE)  # this rank's slice of the layer input
        partial = h_shard @ w_shard.T  # (tokens, d_model)
        gemm_s = median_time_s(lambda: h_shard @ w_shard.T, tp)
        allreduce_s = median_time_s(lambda: ops.all_reduce(partial, tp), tp)
        rows.append((tokens, gemm_s, allreduce_s))
    if rank == 0:
        print(f"Measured on {WORLD_SIZE} CPU ranks, one thread each, d_model={D_MODEL}, d_ff={D_FF} (fp32), "
              f"backend {tp.communicator_for(partial).name!r}; medians. Other processes share this machine, "
              "so take the numbers as an illustration of the split, not a benchmark.")
        print(f"  {'tokens':>6}  {'GEMM of W_r':>12}  {'all-reduce':>12}  {'all-reduce share':>16}")
        for tokens, gemm_s, allreduce_s in rows:
            share = allreduce_s / (gemm_s + allreduce_s)
            print(f"  {tokens:>6}  {gemm_s * 1e6:>9.0f} us  {allreduce_s * 1e6:>9.0f} us  {share:>15.0%}")
    dist.destroy_process_group()


def modeled_gpu_decode():
    """Part 2: one decoder layer of an 8B-class model (d_model 4096, d_ff 14336, 32 query / 8 KV heads of 128)
    at decode on H100s. Per rank the layer streams its weight shards once (bf16); it all-reduces twice (after
    attention and after the MLP), each taken as the link latency plus the bytes over the link."""
    hw = HARDWARE["H100"]
    d_model, d_ff, head_dim, n_heads, n_kv_heads, batch = 4096, 14336, 128, 32, 8, 8
    layer_params = d_model * (n_heads + 2 * n_kv_heads) * head_dim + n_heads * head_dim * d_model + 3 * d_model * d_ff
    print(f"\nMODELED (tp_kernels.perf.cost_model, {hw.name}: {hw.hbm_gbps:.0f} GB/s HBM, {hw.link_gbps:.0f} GB/s and "
          f"{hw.link_latency_us:.0f} us per all-reduce over NVLink; source: {hw.source}).")
    print(f"One 8B-class decoder layer at decode, batch {batch}, bf16:")
    print(f"  {'tp':>3}  {'weights/rank':>12}  {'GEMMs':>8}  {'2 all-reduces':>13}  {'all-reduce share':>16}")
    shares = {}
    for p in (1, 2, 4, 8):
        gemm_us = layer_params * 2 / p / (hw.hbm_gbps * 1e9) * 1e6
        message_bytes = batch * d_model * 2
        allreduce_us = 0.0 if p == 1 else 2 * (hw.link_latency_us + 2 * message_bytes / (hw.link_gbps * 1e9) * 1e6)
        share = shares[p] = allreduce_us / (gemm_us + allreduce_us)
        print(f"  {p:>3}  {layer_params * 2 / p / 1e6:>9.0f} MB  {gemm_us:>5.1f} us  {allreduce_us:>10.1f} us  "
              f"{share:>15.0%}")
    print(f"The GEMM time falls as 1/tp while the all-reduce stays: at tp=8 it is {shares[8]:.0%} of the layer, and\n"
          "every microsecond of latency saved there (one-shot custom all-reduce, fusing it with the residual\n"
          "add and norm, overlapping it with the next GEMM -- tutorial 3) is a direct gain in tokens/s.")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(measure_on_rank, args=(os.path.join(tmp, "rendezvous"),), nprocs=WORLD_SIZE)
    modeled_gpu_decode()
