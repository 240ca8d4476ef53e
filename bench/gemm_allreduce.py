"""Measured on this CPU: gemm_allreduce at TP=2 (two processes, one thread each: one core per rank),
sequential (chunks=1) vs overlapped (chunks=2, 4, and the cost model's choice), over a range of M, with
the overlap efficiency = hidden communication / total communication, where
hidden = T_gemm + T_comm - T_op (T_gemm: the GEMM alone, T_comm: the all-reduce of the output alone).

    python bench/gemm_allreduce.py [--quick]     # rows in bench/results/gemm_allreduce.{csv,json}

The communication is whatever the group's chain picks for a CPU tensor (gloo here unless the
shared-memory communicator is in the chain); the backend is recorded in each row's config.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import tempfile
import time
from typing import Callable, Dict, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from common import Row, Timing, _quantile, markdown_table, write_rows

BENCH = "gemm_allreduce"
WORLD_SIZE = 2
N, K_PER_RANK = 1024, 128  # fp32: 4 KB of all-reduce per 256 kFLOP of GEMM per output row, a balance where
# the communication is a visible share of the GEMM on one core (gloo: ~0.7 ms per MB, DESIGN.md)
MS = (16, 64, 256, 1024, 2048)
CHUNKS = (1, 2, 4, None)


def _interleaved(cases: Dict[object, Callable[[], object]], repeats: int) -> Dict[object, Timing]:
    """Time every case once per round, rounds in rotating order, so that a change of the machine's load
    (other jobs share these cores) lands on every case alike instead of on whichever ran then. Both
    ranks run the same cases in the same order: the collectives match."""
    keys = list(cases)
    samples: Dict[object, List[float]] = {key: [] for key in keys}
    for key in keys:  # warm-up
        cases[key]()
    for round_index in range(repeats):
        for key in keys[round_index % len(keys):] + keys[:round_index % len(keys)]:
            t0 = time.perf_counter()
            cases[key]()
            samples[key].append(time.perf_counter() - t0)
    timings = {}
    for key, values in samples.items():
        values.sort()
        timings[key] = Timing(statistics.median(values), _quantile(values, 0.2), _quantile(values, 0.8), len(values))
    return timings


def _rank(rank: int, init_file: str, ms, repeats: int, queue) -> None:
    torch.set_num_threads(1)  # one core per rank
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE,
                            timeout=datetime.timedelta(seconds=120))
    from tp_kernels import ops
    from tp_kernels.perf import calibration, cost_model
    from tp_kernels.distributed import TPGroup

    tp = TPGroup.from_group()
    hw = calibration.calibrate(tp)  # collective: measured (or cached) on both ranks; chunks=None plans with it
    backend = tp.communicator_for(torch.empty(N)).name
    rows = []
    torch.manual_seed(rank)
    w = torch.randn(N, K_PER_RANK)
    for m in ms:
        x = torch.randn(m, K_PER_RANK)
        partial = x @ w.T
        cases = {"gemm": lambda: x @ w.T, "comm": lambda: tp.all_reduce(partial)}
        for chunks in CHUNKS:
            cases[chunks] = lambda c=chunks: ops.gemm_allreduce(x, w, None, tp, c)
        timings = _interleaved(cases, repeats)
        t_gemm, t_comm, seq = timings["gemm"], timings["comm"], timings[1]
        common = dict(dtype="float32", shape=f"M={m} N={N} K_per_rank={K_PER_RANK}", world_size=WORLD_SIZE)
        rows.append(Row.from_timing(BENCH, "gemm_alone", t_gemm, config="x @ w.T", **common))
        rows.append(Row.from_timing(BENCH, "allreduce_alone", t_comm, config=f"tp.all_reduce backend={backend}",
                                    **common))
        for chunks in CHUNKS:
            t = timings[chunks]
            k = chunks or cost_model.best_chunks(m, N, K_PER_RANK, WORLD_SIZE, torch.float32, hw)
            hidden = t_gemm.median_s + t_comm.median_s - t.median_s
            label = ("sequential chunks=1" if chunks == 1 else
                     f"overlapped chunks={chunks}" if chunks else f"cost model chunks=None->{k}")
            rows.append(Row.from_timing(
                BENCH, "gemm_allreduce", t, config=f"{label} backend={backend} threads/rank=1", **common,
                baseline="sequential chunks=1", ratio=seq.median_s / t.median_s,
                notes=f"overlap efficiency {hidden / t_comm.median_s:+.2f} (hidden comm / total comm)"))
    if rank == 0:
        queue.put((rows, hw))
    tp.close()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repeats (a smoke run)")
    args = parser.parse_args()
    ms, repeats = ((16, 256), 5) if args.quick else (MS, 25)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_rank, args=(r, os.path.join(tmp, "init"), ms, repeats, queue))
                 for r in range(WORLD_SIZE)]
        for p in procs:
            p.start()
        rows, hw = queue.get(timeout=1800)
        for p in procs:
            p.join()
    write_rows(BENCH, rows)
    print(f"calibrated cost model: overlap_efficiency={hw.overlap_efficiency:.2f} "
          f"link {hw.link_gbps:.2f} GB/s latency {hw.link_latency_us:.0f} us "
          f"fp32 {hw.tflops_fp32 * 1e3:.1f} GFLOP/s ({hw.source})")
    print(markdown_table(rows, ["case", "shape", "config", "median_us", "p20_us", "p80_us", "ratio", "notes"]))


if __name__ == "__main__":
    main()
