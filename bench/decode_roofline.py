"""The roofline of bench/decode_e2e.py's rows, measured in the same run (tp_kernels.models.roofline): the GB/s
of a matrix-vector product over 256 MiB of fp32.

- `measure`: one probe at the start of the run, for the table's header: one process on 1 and on 2 threads,
  and two one-thread processes at once (after a barrier, so that both stream together; their sum is what the
  memory system gives two ranks).
- `RoundProbes`: the probes each row divides by, taken in the row's own processes between its timed rounds,
  every rank at once on its own threads. The host's memory bandwidth moves by tens of percent within minutes
  on the shared VM this was written on, so only a probe taken next to the rounds says what they could reach.
"""
from __future__ import annotations

import statistics
from typing import List, Tuple

import torch

from tp_kernels.models.roofline import GemvProbe, all_ranks_barrier, gemv_gbps, gemv_gbps_on_all_ranks


def _one_process(tp):
    return gemv_gbps(1), gemv_gbps(2)


def measure(launch) -> dict:
    """launch is tp_kernels.models.launch.run_on_cpu_ranks."""
    one_thread, two_threads = launch(1, _one_process)[0]
    pair = launch(2, gemv_gbps_on_all_ranks)
    return {"one_process_1_thread": one_thread, "one_process_2_threads": two_threads,
            "two_processes_each": pair, "two_processes_total": sum(pair)}


class RoundProbes:
    """On one rank of a row: `take()` before each timed round and once after the last; `gbps` lists this
    rank's figures. Every rank of the row must take each probe (they meet in a barrier)."""

    def __init__(self, tp):
        self._probe = GemvProbe()
        self._barrier = all_ranks_barrier(tp)
        self.gbps: List[float] = []

    def take(self) -> None:
        self.gbps.append(self._probe.gbps(torch.get_num_threads(), self._barrier))

    def release(self) -> List[float]:
        """Frees the matrix (256 MiB) and returns the figures."""
        self._probe = None
        return self.gbps


def gbps_per_rank(probes_of_ranks: List[List[float]]) -> Tuple[float, float, float]:
    """(median, min, max) over a row's probes of the GB/s each rank streams while all stream at once (the
    ranks' sum / their number, per probe)."""
    per_probe = [sum(figures) / len(figures) for figures in zip(*probes_of_ranks)]
    if not per_probe:
        raise ValueError("no roofline probe was taken")
    return statistics.median(per_probe), min(per_probe), max(per_probe)
