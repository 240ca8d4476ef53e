"""The decode roofline of this machine, measured: how fast a matrix-vector product streams a weight matrix
from memory, in one process and in two processes at once (bench/decode_e2e.py runs it in the same run as
the decode rows it divides).

A batch-1 decode step is a chain of matrix-vector products over every weight of the rank, so its ceiling
is (bytes the step reads) / (GB/s a matrix-vector product streams). The matrix is 256 MiB of fp32 (65536 x
1024), 32x this host's 8 MiB L3, so every call streams it from DRAM; the product is F.linear with one row,
the call the decoder makes. Two processes at once: both start timing after a barrier, and each reports
its own median; their sum is what the memory system gives two ranks.
"""
from __future__ import annotations

import time
from typing import List

import torch
import torch.nn.functional as F

MATRIX_SHAPE = (65536, 1024)  # fp32: 256 MiB
WARMUP, REPEATS = 3, 15


def gemv_gbps(threads: int, barrier=None) -> float:
    """Median GB/s (1e9 bytes) of y = F.linear(x, W) over the 256 MiB matrix, on `threads` threads; barrier
    (a callable) is called before timing so that processes measuring together start together."""
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(MATRIX_SHAPE, generator=gen)
    x = torch.randn(1, MATRIX_SHAPE[1], generator=gen)
    for _ in range(WARMUP):
        F.linear(x, weight)
    if barrier is not None:
        barrier()
    samples: List[float] = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        F.linear(x, weight)
        samples.append(time.perf_counter() - t0)
    samples.sort()
    return weight.numel() * weight.element_size() / samples[len(samples) // 2] / 1e9


def rank_gemv_gbps(tp) -> float:
    """On each rank of a run_on_cpu_ranks group: this rank's GB/s with one thread, all ranks at once."""
    import torch.distributed as dist

    return gemv_gbps(1, barrier=lambda: dist.barrier(group=tp.process_group))


def measure(launch) -> dict:
    """GB/s of one process with 1 and 2 threads, and of two one-thread processes at once (each, and their
    sum). launch is tp_kernels.models.launch.run_on_cpu_ranks."""
    one_thread, two_threads = launch(1, _one_process_gbps)[0]
    pair = launch(2, rank_gemv_gbps)
    return {"one_process_1_thread": one_thread, "one_process_2_threads": two_threads,
            "two_processes_each": pair, "two_processes_total": sum(pair)}


def _one_process_gbps(tp):
    return gemv_gbps(1), gemv_gbps(2)
