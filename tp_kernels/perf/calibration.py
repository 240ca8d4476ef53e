"""The Hardware a group's overlap ops plan their chunk counts with, and the explicit calibration of a CPU host.

Where the constants come from, first match:
1. `set_hardware(tp, hw)` or `calibrate(tp)` (which measures this host and sets them);
2. a CUDA device: the datasheet entry of its GPU (cost_model.HARDWARE; the H100's, with a warning, for
   an unknown GPU);
3. otherwise (a CPU group never calibrated): none; the ops then run chunks=None as one chunk, which is
   what the CPU measurements support (README: extra chunks did not pay on this host).
No op measures, writes files or runs collectives of its own to get them: calibration is a call of yours.

The chunk count of a pipelined op decides how many collectives each rank issues, so every rank of a
group must plan with the same constants: `calibrate` measures on every rank and averages the figures over
the group, or sends rank 0's cached figures to all; it is collective (call it on every rank). The cache is
one JSON file per host, world size, thread count, backend and torch version under TP_KERNELS_CACHE_DIR
(default ~/.cache/tp_kernels).
"""
from __future__ import annotations

import json
import logging
import os
import socket
import statistics
import tempfile
import time
import weakref
from typing import Callable, Dict, Optional

import torch

from tp_kernels.perf import cost_model
from tp_kernels.distributed import TPGroup
from tp_kernels.comm import thread as comm_thread

log = logging.getLogger(__name__)

_HARDWARE: "weakref.WeakKeyDictionary[TPGroup, cost_model.Hardware]" = weakref.WeakKeyDictionary()
_WARNED_GPUS = set()
CACHE_ENV = "TP_KERNELS_CACHE_DIR"
# Sizes of the calibration: a GEMM of 2 * 64 * 256 * 256 = 8 MFLOP (4 ms in fp32 on one loaded core at
# 2 GFLOP/s; 50 ms in bf16, which these x86 cores run at ~0.15 GFLOP/s without native bf16 math), an
# all-reduce of 1 KB (latency) and of 1 MB (bandwidth), five repeats each: ~0.5 s in all.
_GEMM_SHAPE = (64, 256, 256)
_SMALL_ELEMS, _LARGE_ELEMS = 256, 256 * 1024
_REPEATS = 5
_FIELDS = ("tflops_bf16", "tflops_fp32", "hbm_gbps", "link_gbps", "link_latency_us", "launch_overhead_us",
           "overlap_efficiency")


def cache_dir() -> str:
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "tp_kernels")


def set_hardware(tp: TPGroup, hw: Optional[cost_model.Hardware]) -> None:
    """Plan tp's overlap ops with hw (e.g. a GPU of cost_model.HARDWARE, or constants of your own); None
    goes back to the default (datasheet on CUDA, one chunk on CPU). Call it on every rank with the same hw."""
    if hw is None:
        _HARDWARE.pop(tp, None)
        return
    if not isinstance(hw, cost_model.Hardware):
        raise TypeError(f"hw must be a tp_kernels.perf.cost_model.Hardware or None, got {type(hw).__name__}")
    _HARDWARE[tp] = hw


def hardware_for(tp: TPGroup, device: torch.device) -> Optional[cost_model.Hardware]:
    """The constants tp's ops plan with on device: set_hardware's or calibrate's, else the datasheet of the
    device's GPU, else None (a CPU group never calibrated). Never measures, reads files or communicates."""
    hw = _HARDWARE.get(tp)
    if hw is not None:
        return hw
    if device.type == "cuda":
        return _gpu_hardware(device)
    return None


def calibrate(tp: TPGroup, force: bool = False) -> cost_model.Hardware:
    """Measure this CPU host for tp's overlap ops (or take rank 0's cached figures unless force) and plan
    with the result from now on; returns it. Collective: call it on every rank of tp. ~0.5 s."""
    hw = calibrate_cpu(tp, force)
    set_hardware(tp, hw)
    return hw


def _gpu_hardware(device: torch.device) -> cost_model.Hardware:
    name = torch.cuda.get_device_name(device)
    for key, hw in cost_model.HARDWARE.items():
        if key in name:
            return hw
    if name not in _WARNED_GPUS:
        _WARNED_GPUS.add(name)
        log.warning("tp_kernels: no constants for GPU %r; overlap chunk counts are planned with the H100's. "
                    "Give yours with tp_kernels.perf.calibration.set_hardware(tp, Hardware(...)).", name)
    return cost_model.HARDWARE["H100"]


# ----------------------------------------------------------------------------------------------------------
# CPU calibration
# ----------------------------------------------------------------------------------------------------------
def _cache_path(tp: TPGroup) -> str:
    probe = torch.empty(_LARGE_ELEMS, dtype=torch.float32)
    backend = tp.communicator_for(probe).name
    key = (f"{socket.gethostname()}-ws{tp.world_size}-threads{torch.get_num_threads()}-{backend}-"
           f"torch{torch.__version__}")
    return os.path.join(cache_dir(), f"overlap-calibration-{key.replace('/', '_')}.json")


def _median_time_s(fn: Callable[[], object], repeats: int = _REPEATS) -> float:
    fn()  # warm-up: first-call allocations and lazy initialization
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _measure(tp: TPGroup) -> Dict[str, float]:
    """This rank's figures. Every rank runs the same collectives in the same order."""
    m, n, k = _GEMM_SHAPE
    rates = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        rates[dtype] = 2.0 * m * n * k / _median_time_s(lambda: a @ b) / 1e12
    tiny_a, tiny_b = torch.randn(1, 16), torch.randn(16, 16)
    launch_s = _median_time_s(lambda: tiny_a @ tiny_b)
    src = torch.randn(2 * 1024 * 1024)  # 8 MB: a copy larger than the L2 of these hosts
    copy_s = _median_time_s(lambda: src.clone())
    small, large = torch.randn(_SMALL_ELEMS), torch.randn(_LARGE_ELEMS)
    t_small = _median_time_s(lambda: tp.all_reduce(small))
    t_large = _median_time_s(lambda: tp.all_reduce(large))
    share = 2.0 * (tp.world_size - 1) / tp.world_size
    link_gbps = share * (_LARGE_ELEMS - _SMALL_ELEMS) * 4 / max(t_large - t_small, 1e-9) / 1e9
    # Overlap: a GEMM of about the large all-reduce's duration on this thread, the all-reduce on the
    # communication thread, as the pipeline runs them.
    gemm_rows = max(1, int(m * t_large / max(2.0 * m * n * k / (rates[torch.float32] * 1e12), 1e-9)))
    a, b = torch.randn(gemm_rows, k), torch.randn(k, n)
    t_gemm = _median_time_s(lambda: a @ b)

    def both():
        future = comm_thread.submit(tp, tp.all_reduce, large)
        a @ b
        future.result()

    t_both = _median_time_s(both)
    hidden = t_gemm + t_large - t_both
    efficiency = min(1.0, max(0.0, hidden / max(min(t_gemm, t_large), 1e-9)))
    return {"tflops_bf16": rates[torch.bfloat16], "tflops_fp32": rates[torch.float32],
            "hbm_gbps": 2.0 * src.numel() * 4 / copy_s / 1e9, "link_gbps": link_gbps,
            "link_latency_us": t_small * 1e6, "launch_overhead_us": launch_s * 1e6,
            "overlap_efficiency": efficiency}


def _read_cache(path: str) -> Optional[Dict[str, float]]:
    try:
        with open(path) as f:
            figures = json.load(f)
        return {name: float(figures[name]) for name in _FIELDS}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_cache(path: str, figures: Dict[str, float]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(figures, f, indent=1)
    os.replace(tmp, path)  # atomic: a reader sees the old file or the whole new one


def calibrate_cpu(tp: TPGroup, force: bool = False) -> cost_model.Hardware:
    """The CPU Hardware of this host for tp, identical on every rank. Collective: call it on every rank.

    Rank 0's cached figures are used when it has them (and force is False); otherwise every rank
    measures (~0.1 s) and the group's mean is used and cached by rank 0."""
    if tp.world_size < 2:
        raise ValueError(f"calibrate_cpu needs a group of at least 2 ranks to time its collectives, "
                         f"got world size {tp.world_size}")
    path = _cache_path(tp)
    # [have cache, figures...] from rank 0 only, the other ranks contribute zeros: the sum is rank 0's.
    message = torch.zeros(1 + len(_FIELDS), dtype=torch.float64)
    cached = None if force or tp.rank != 0 else _read_cache(path)
    if cached is not None:
        message[0] = 1.0
        message[1:] = torch.tensor([cached[name] for name in _FIELDS], dtype=torch.float64)
    message = tp.all_reduce(message)
    if message[0] == 1.0:
        figures = dict(zip(_FIELDS, message[1:].tolist()))
        source = f"calibrated on {socket.gethostname()} (cached in {path})"
    else:
        mine = _measure(tp)
        mean = tp.all_reduce(torch.tensor([mine[name] for name in _FIELDS], dtype=torch.float64)) / tp.world_size
        figures = dict(zip(_FIELDS, mean.tolist()))
        if tp.rank == 0:
            _write_cache(path, figures)
        source = (f"calibrated on {socket.gethostname()} at {time.strftime('%Y-%m-%d %H:%M:%S')} "
                  f"(mean of {tp.world_size} ranks)")
        log.info("tp_kernels: calibrated the overlap cost model of group %s: %s", tp.name, figures)
    return cost_model.Hardware(name=f"cpu:{socket.gethostname()}", source=source, **figures)
