"""Running a function on N local ranks when no launcher such as torchrun did it for us: the generate CLI and
the demo use it. CPU ranks talk over gloo; CUDA ranks take one GPU each (rank r on cuda:r) and talk over
NCCL, with gloo beside it for CPU tensors. Each rank initializes torch.distributed through a file://
rendezvous in a private temporary directory, runs fn(tp, *args) and sends back its result or its traceback."""
from __future__ import annotations

import os
import queue
import shutil
import tempfile
import time
import traceback
from typing import Any, Callable, List

import torch
import torch.multiprocessing as mp

# A rank that has not answered by then is reported by number instead of being waited for forever.
DEFAULT_TIMEOUT_S = 600.0
POLL_S = 0.5  # how often the parent checks for crashed rank processes
FAILURE_GRACE_S = 30.0  # after one rank failed, how long the others get to report


BACKENDS = {"cpu": "gloo", "cuda": "cpu:gloo,cuda:nccl"}  # TPGroup.init puts a nccl rank on GPU rank % count


def _rank_main(rank: int, world_size: int, init_file: str, threads_per_rank: int, backend: str, fn: Callable,
               args: tuple, results) -> None:
    torch.set_num_threads(threads_per_rank)
    from tp_kernels.distributed import TPGroup

    try:
        tp = TPGroup.init(rank=rank, world_size=world_size, backend=backend, init_method=f"file://{init_file}")
        try:
            results.put((rank, True, fn(tp, *args)))
        finally:
            tp.close()
            torch.distributed.destroy_process_group()
    except BaseException:  # noqa: BLE001  (reported to the parent, which raises it)
        results.put((rank, False, traceback.format_exc()))


def run_on_cpu_ranks(world_size: int, fn: Callable, *args, timeout_s: float = DEFAULT_TIMEOUT_S) -> List[Any]:
    """fn(tp, *args) on world_size new CPU processes (gloo); see run_on_ranks."""
    return run_on_ranks(world_size, fn, *args, device_type="cpu", timeout_s=timeout_s)


def run_on_ranks(world_size: int, fn: Callable, *args, device_type: str = "cpu",
                 timeout_s: float = DEFAULT_TIMEOUT_S) -> List[Any]:
    """fn(tp, *args) on world_size new processes; returns the results in rank order. device_type "cuda" puts
    rank r on cuda:r (so it needs world_size visible GPUs). fn must be a module-level function (it is
    pickled). Raises RuntimeError with the tracebacks of failed ranks, or TimeoutError naming the ranks that
    did not answer within timeout_s."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if device_type not in BACKENDS:
        raise ValueError(f"device_type must be one of {sorted(BACKENDS)}, got {device_type!r}")
    if device_type == "cuda" and torch.cuda.device_count() < world_size:
        raise ValueError(f"{world_size} CUDA ranks need {world_size} GPUs (one each), "
                         f"{torch.cuda.device_count()} visible")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    tmp = tempfile.mkdtemp(prefix="tp_kernels-launch-")
    # ranks share the cores: more threads than cores per rank only adds contention
    threads_per_rank = max(1, (os.cpu_count() or 1) // world_size)
    procs = [ctx.Process(target=_rank_main, daemon=True,
                         args=(rank, world_size, os.path.join(tmp, "rendezvous"), threads_per_rank,
                               BACKENDS[device_type], fn, args, results))
             for rank in range(world_size)]
    try:
        for p in procs:
            p.start()
        done, failed = {}, {}
        deadline = time.monotonic() + timeout_s
        while len(done) + len(failed) < world_size:
            try:
                rank, ok, payload = results.get(timeout=POLL_S)
                (done if ok else failed)[rank] = payload
                if failed:  # the others may wait in a collective on the failed rank: short grace only
                    deadline = min(deadline, time.monotonic() + FAILURE_GRACE_S)
                continue
            except queue.Empty:
                pass
            for rank, p in enumerate(procs):  # a crashed process never reports: notice it here
                if rank not in done and rank not in failed and p.exitcode not in (None, 0):
                    failed[rank] = f"rank {rank}'s process exited with code {p.exitcode} without a result"
                    deadline = min(deadline, time.monotonic() + FAILURE_GRACE_S)
            if time.monotonic() > deadline:
                if failed:
                    break
                missing = sorted(set(range(world_size)) - set(done))
                raise TimeoutError(f"ranks {missing} of {world_size} did not finish {fn.__name__} within "
                                   f"{timeout_s:.0f} s")
        if failed:
            report = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(failed.items()))
            raise RuntimeError(f"{fn.__name__} failed on ranks {sorted(failed)}:\n{report}")
        return [done[r] for r in range(world_size)]
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
        shutil.rmtree(tmp, ignore_errors=True)
