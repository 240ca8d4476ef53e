"""GPU collectives at TP=2, measured: the all-reduce of each backend in the group's chain (CUDA IPC, and
torch.distributed: NCCL, or gloo where NCCL cannot run), the fused all-reduce + residual + RMSNorm vs the
two steps, and gemm_allreduce vs the GEMM followed by the all-reduce.

    python bench/gpu_collectives.py     # rows in bench/results/gpu_collectives.{csv,json}, a latency plot

Rank r runs on GPU r % (visible GPUs). With 2 or more GPUs the group is NCCL (gloo for host-side
barriers) and the rows are what a TP=2 node sees. On ONE GPU both ranks share it: NCCL refuses two ranks
on one device, so torch's backend is gloo (copies through the host), and the kernels of two processes
time-slice on the GPU (no MPS), so a kernel that waits for its peer waits for a context switch; those rows
time the sharing, not the algorithm, and their notes say so.

Timing: CUDA events around a block of calls, after a barrier, the same fixed counts on every rank
(do_bench picks its repeat count per process, and unequal counts of collectives would deadlock); each
repeat's time is the slower rank's; median and p20/p80 over repeats. Rows are written after each section,
so a run stopped by gpu-check's budget keeps what it measured.
"""
from __future__ import annotations

import datetime
import math
import os
import sys
from typing import Callable, List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from common import RESULTS_DIR, Row, markdown_table, plot_lines, timing_from_samples, write_rows
from gpu_ranks import parse_args, run_ranks

BENCH = "gpu_collectives"
WORLD_SIZE = 2
DTYPE = torch.bfloat16
ALL_REDUCE_BYTES = (8 << 10, 256 << 10, 4 << 20)  # one-shot, two-shot, the IPC buffer's half (8 MiB buffer)
NORM_TOKENS, HIDDEN = (1, 16, 128), 4096
# Llama-70B's o_proj at TP=8 (K/rank 1024) is too small to overlap; down_proj (K/rank 3584) is where the
# modeled gain is (README, 1.3-1.6x at M >= 1024)
GEMM_M, GEMM_N, GEMM_K_PER_RANK = (16, 1024, 4096), 8192, 3584
WARMUP, REPEATS, CALLS = 3, 10, 10


def time_calls(fn: Callable[[], object], barrier_group) -> List[float]:
    """Seconds per call of fn, one sample per repeat (CALLS calls between two CUDA events)."""
    for _ in range(WARMUP):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for _ in range(REPEATS):
        dist.barrier(group=barrier_group)
        start.record()
        for _ in range(CALLS):
            fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3 / CALLS)
    return samples


def slowest_rank(samples: List[float], barrier_group) -> List[float]:
    """Per repeat, the slower rank's time: a collective is done when its last rank is."""
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, samples, group=barrier_group)
    return [max(per_rank) for per_rank in zip(*gathered)]


def _rank(rank: int, init_file: str, results_dir: str) -> None:
    n_gpus = torch.cuda.device_count()
    torch.cuda.set_device(rank % n_gpus)
    shared_gpu = n_gpus < WORLD_SIZE
    backend = "gloo" if shared_gpu else "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE,
                            timeout=datetime.timedelta(seconds=60))
    barrier_group = dist.new_group(backend="gloo")
    from tp_kernels import ops
    from tp_kernels.distributed import TPGroup

    tp = TPGroup.from_group()
    torch_backend = "gloo" if shared_gpu else "nccl"
    note = (f"{WORLD_SIZE} ranks share one GPU: their kernels time-slice, so this times the sharing, not the "
            "algorithm" if shared_gpu else "")
    rows: List[Row] = []

    def add(case: str, samples: List[float], config: str, shape: str, baseline: Optional[str] = None,
            baseline_s: Optional[float] = None, nbytes: Optional[int] = None, flops: Optional[float] = None) -> float:
        """A row from this rank's samples and the peer's (the slower of each repeat); its median seconds."""
        timing = timing_from_samples(slowest_rank(samples, barrier_group))
        t = timing.median_s
        rows.append(Row.from_timing(BENCH, case, timing, config=config, dtype=str(DTYPE)[6:], shape=shape,
                                    world_size=WORLD_SIZE, baseline=baseline,
                                    ratio=baseline_s / t if baseline_s else None,
                                    gbps=nbytes / t / 1e9 if nbytes else None,
                                    tflops=flops / t / 1e12 if flops else None, notes=note))
        return t

    def flush():
        if rank == 0:
            write_rows(BENCH, rows, results_dir)

    # -- all-reduce per backend of the chain ------------------------------------------------------------
    for nbytes in ALL_REDUCE_BYTES:
        x = torch.randn(nbytes // 2, device="cuda").to(DTYPE)
        shape = f"{nbytes // 1024} KiB"
        applying = [c for c in tp.communicators if c.name != "identity" and c.applies(x)]
        torch_comm = next(c for c in applying if c.name == "torch")
        # gbps: bytes per rank / time (algorithm bandwidth, as nccl-tests' algbw)
        torch_s = add("torch", time_calls(lambda: torch_comm.all_reduce(x), barrier_group),
                      f"backend={torch_backend}", shape, nbytes=nbytes)
        for comm in applying:
            if comm is not torch_comm:
                add(comm.name, time_calls(lambda: comm.all_reduce(x), barrier_group), f"backend={comm.name}",
                    shape, baseline="torch", baseline_s=torch_s, nbytes=nbytes)
        if not any(c.name == "ipc" for c in applying):
            in_chain = any(c.name == "ipc" for c in tp.communicators)
            rows.append(Row(bench=BENCH, case="ipc", config="backend=ipc", dtype=str(DTYPE)[6:], shape=shape,
                            world_size=WORLD_SIZE, median_us=math.nan, p20_us=math.nan, p80_us=math.nan,
                            notes="its predicate refuses this size" if in_chain else
                            "not in this group's chain: CudaIpcCommunicator.create declined (see the log's warning)"))
    flush()

    # -- fused all-reduce + residual + RMSNorm vs the two steps -----------------------------------------
    for n_tokens in NORM_TOKENS:
        x = torch.randn(n_tokens, HIDDEN, device="cuda").to(DTYPE)
        residual = torch.randn_like(x)
        weight = torch.randn(HIDDEN, device="cuda").to(DTYPE)
        shape = f"T={n_tokens} hidden={HIDDEN}"
        steps_s = add("all_reduce + add_rmsnorm",
                      time_calls(lambda: ops.add_rmsnorm(ops.all_reduce(x, tp), residual, weight, 1e-6), barrier_group),
                      "two ops", shape)
        add("allreduce_residual_rmsnorm",
            time_calls(lambda: ops.allreduce_residual_rmsnorm(x, residual, weight, 1e-6, tp), barrier_group),
            "fused op", shape, baseline="all_reduce + add_rmsnorm", baseline_s=steps_s)
    flush()

    # -- gemm_allreduce vs the GEMM, then the all-reduce ------------------------------------------------
    w = (torch.randn(GEMM_N, GEMM_K_PER_RANK, device="cuda") / GEMM_K_PER_RANK ** 0.5).to(DTYPE)
    for m in GEMM_M:
        x = torch.randn(m, GEMM_K_PER_RANK, device="cuda").to(DTYPE)
        shape = f"M={m} N={GEMM_N} K/rank={GEMM_K_PER_RANK}"
        flops = 2.0 * m * GEMM_N * GEMM_K_PER_RANK
        seq_s = add("sequential", time_calls(lambda: ops.all_reduce(F.linear(x, w), tp), barrier_group),
                    "F.linear then ops.all_reduce", shape, flops=flops)
        for chunks in (1, 4, None):
            add(f"gemm_allreduce chunks={chunks if chunks else 'auto'}",
                time_calls(lambda: ops.gemm_allreduce(x, w, None, tp, chunks), barrier_group), "ops.gemm_allreduce",
                shape, baseline="sequential", baseline_s=seq_s, flops=flops)
    flush()

    if rank == 0:
        series = {}
        for r in rows:
            if r.config.startswith("backend=") and not math.isnan(r.median_us):
                xs, ys = series.setdefault(r.case, ([], []))
                xs.append(int(r.shape.split()[0]))
                ys.append(r.median_us)
        if series:
            plot_lines(os.path.join(results_dir, f"{BENCH}_all_reduce.png"),
                       f"all-reduce, {WORLD_SIZE} ranks, bf16 ({torch.cuda.get_device_name()})", "KiB per rank",
                       "latency (us)", series)
        print(markdown_table(rows, ["case", "config", "shape", "median_us", "p20_us", "p80_us", "ratio", "notes"]))
    tp.close()
    dist.destroy_process_group()


def main(argv=None) -> int:
    args = parse_args(BENCH, __doc__.splitlines()[0], RESULTS_DIR, argv)
    exit_codes = run_ranks(WORLD_SIZE, _rank, args.results_dir)
    failed = [r for r, code in enumerate(exit_codes) if code != 0]
    if failed:
        print(f"{BENCH}: ranks {failed} failed (exit codes {exit_codes})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
