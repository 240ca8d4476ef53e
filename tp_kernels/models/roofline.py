"""The decode roofline of a machine, measured: how fast a matrix-vector product streams a weight matrix
from memory. A batch-1 decode step is a chain of matrix-vector products over every weight of the rank, so
its tokens/s cannot exceed (GB/s streamed) / (bytes the step reads, GPT.decode_bytes_per_rank).

The matrix is 256 MiB of fp32 (65536 x 1024), far above a CPU's last-level cache, so every call streams it
from DRAM; the product is F.linear with one row, the call the decoder makes. The demo and
bench/decode_e2e.py measure it in the same run as the decode they divide by it.
"""
from __future__ import annotations

import time
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F

MATRIX_SHAPE = (65536, 1024)  # fp32: 256 MiB
WARMUP, REPEATS = 3, 15


def gemv_gbps(threads: int, barrier: Optional[Callable[[], None]] = None) -> float:
    """Median GB/s (1e9 bytes) of y = F.linear(x, W) over the 256 MiB matrix on `threads` threads (the
    process's thread count is restored after). barrier, if given, is called right before timing, so that
    processes measuring together stream together."""
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
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
    finally:
        torch.set_num_threads(saved_threads)
    samples.sort()
    return weight.numel() * weight.element_size() / samples[len(samples) // 2] / 1e9


def gemv_gbps_on_all_ranks(tp) -> float:
    """This rank's GB/s on one thread while every rank of tp measures at the same time (a barrier first)."""
    import torch.distributed as dist

    barrier = (lambda: dist.barrier(group=tp.process_group)) if tp.process_group is not None else None
    return gemv_gbps(1, barrier)
