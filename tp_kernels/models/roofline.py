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


class GemvProbe:
    """The 256 MiB matrix and its input, kept so that the roofline can be probed again and again in the same
    process (filling the matrix takes about a second; streaming it once, ~20 ms): a benchmark probes between
    its timed rounds, so that each figure it divides by was measured next to the rounds it divides."""

    def __init__(self):
        gen = torch.Generator().manual_seed(0)
        self.weight = torch.randn(MATRIX_SHAPE, generator=gen)
        self.x = torch.randn(1, MATRIX_SHAPE[1], generator=gen)

    def gbps(self, threads: int, barrier: Optional[Callable[[], None]] = None) -> float:
        """Median GB/s (1e9 bytes) of y = F.linear(x, W) over the matrix on `threads` threads (the process's
        thread count is restored after). barrier, if given, is called right before timing, so that
        processes measuring together stream together."""
        saved_threads = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            for _ in range(WARMUP):
                F.linear(self.x, self.weight)
            if barrier is not None:
                barrier()
            samples: List[float] = []
            for _ in range(REPEATS):
                t0 = time.perf_counter()
                F.linear(self.x, self.weight)
                samples.append(time.perf_counter() - t0)
        finally:
            torch.set_num_threads(saved_threads)
        samples.sort()
        return self.weight.numel() * self.weight.element_size() / samples[len(samples) // 2] / 1e9


def gemv_gbps(threads: int, barrier: Optional[Callable[[], None]] = None) -> float:
    """GemvProbe().gbps(threads, barrier): one probe with a matrix of its own."""
    return GemvProbe().gbps(threads, barrier)


def all_ranks_barrier(tp) -> Optional[Callable[[], None]]:
    """A barrier over tp's process group (None without one), for probes that every rank takes at once."""
    import torch.distributed as dist

    return (lambda: dist.barrier(group=tp.process_group)) if tp.process_group is not None else None


def gemv_gbps_on_all_ranks(tp) -> float:
    """This rank's GB/s on one thread while every rank of tp measures at the same time (a barrier first)."""
    return gemv_gbps(1, all_ranks_barrier(tp))
